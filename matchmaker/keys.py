"""Every Redis key, channel and status the broker uses, defined once.

The Lua scripts in ``registry`` build the same names from ``PREFIX``; keep them in step.
"""

from __future__ import annotations

from enum import StrEnum

PREFIX = "cb:"

#: Set while the registry's contents are complete; absent after Redis lost its data.
EPOCH = PREFIX + "epoch"
#: Held while one process rebuilds the registry from the database.
REBUILD_LOCK = PREFIX + "rebuild-lock"
#: Sorted set: peer id -> time of its last heartbeat.
HEARTBEATS = PREFIX + "hb"
#: Set of runtime buckets that have (or had) peers.
BUCKETS = PREFIX + "buckets"
#: Sorted set: pending session id -> created time (matching order).
PENDING = PREFIX + "pending"
#: Set when capacity grew; the rematch job clears it before retrying pending sessions.
REMATCH_FLAG = PREFIX + "rematch"

#: The rq queue the matchmaker workers listen on.
QUEUE_NAME = "matchmaker"


def peer(user_id: str) -> str:
    """Hash: total, held, address, pubKey, runtime, bucket of one peer."""
    return f"{PREFIX}peer:{user_id}"


def free(bucket: str) -> str:
    """Sorted set: peer id -> free slots, for peers of one runtime bucket."""
    return f"{PREFIX}free:{bucket}"


def alloc(session_id: str) -> str:
    """Hash: peer id -> slots reserved for one session."""
    return f"{PREFIX}alloc:{session_id}"


def session_channel(session_id: str) -> str:
    """Pub/sub channel on which a session's status changes are published."""
    return f"{PREFIX}session:{session_id}"


class Status(StrEnum):
    """Session statuses (SPEC, "Session status")."""

    PENDING = "pending"
    MATCHED = "matched"
    PARTIAL = "partial"
    FAILED = "failed"
    CLOSED = "closed"


#: Statuses whose members hold slots.
HOLDING = (Status.MATCHED.value, Status.PARTIAL.value)


def post_lock(user_id: str) -> str:
    """Lock held while one account's pool request is counted and created."""
    return f"{PREFIX}post-lock:{user_id}"


def long_polls(user_id: str) -> str:
    """Counter of one account's long-polls waiting now (in any API process)."""
    return f"{PREFIX}polls:{user_id}"
