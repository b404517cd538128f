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
#: Set of peer ids whose address probe was asked for and has no outcome yet.
PROBING = PREFIX + "probing"
#: Set when capacity grew; the rematch job clears it before retrying pending sessions.
REMATCH_FLAG = PREFIX + "rematch"

#: The rq queue the matchmaker workers listen on.
QUEUE_NAME = "matchmaker"


def peer(user_id: str) -> str:
    """Hash: total, held, address, pubKey, runtime, bucket of one peer, and its address
    proof: subject (of the address and key announced), proof (the subject proven),
    probe, probeState, probeAt, probeDetail, probeRetry (the last probe asked for)."""
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


class ProofState(StrEnum):
    """Where a peer's address proof stands (the registry's ``probeState``)."""

    UNPROVEN = "unproven"  # no probe asked for yet (no slots offered)
    PROBING = "probing"  # a probe is queued or running
    PROVEN = "proven"  # the registered key answered at the address: matchable
    FAILED = "failed"  # the probe failed; tried again when the host announces its slots
    LIMITED = "limited"  # deferred by the probe rate limits; tried again after a while


#: Statuses whose members hold slots.
HOLDING = (Status.MATCHED.value, Status.PARTIAL.value)


#: The rq queue of address probes (network I/O: kept off the matching queue's path).
PROBE_QUEUE = "probes"


def probe_rate_account(user_id: str) -> str:
    """Counter of the probes asked for by one account in the current window."""
    return f"{PREFIX}probe-rate:account:{user_id}"


def probe_rate_target(target: str) -> str:
    """Counter of the probes sent to one ``ip:port`` in the current window."""
    return f"{PREFIX}probe-rate:target:{target}"


def probe_rate_ip(ip: str) -> str:
    """Counter of the probes sent to any port of one IP in the current window."""
    return f"{PREFIX}probe-rate:ip:{ip}"


def post_lock(user_id: str) -> str:
    """Lock held while one account's pool request is counted and created."""
    return f"{PREFIX}post-lock:{user_id}"


def long_polls(user_id: str) -> str:
    """Counter of one account's long-polls waiting now (in any API process)."""
    return f"{PREFIX}polls:{user_id}"
