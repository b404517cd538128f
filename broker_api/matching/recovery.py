"""Rebuilding Redis state from the database, so losing Redis loses nothing.

The database is the record of accounts, sessions and members; Redis holds only what
can be rebuilt: reservations (from members of open sessions), pending requests (from
sessions still ``pending``) and availability (from the peers' next heartbeats).
"""

from __future__ import annotations

import logging
import time

from rq import Queue

from broker_api.matching import keys
from broker_api.matching.keys import Status
from broker_api.matching.queue import enqueue_match, enqueue_probe
from broker_api.matching.registry import MatchmakerError, Registry
from broker_api.models import Member, Session, db

log = logging.getLogger(__name__)


def ensure_registry(registry: Registry, queue: Queue, *, wait: float = 30.0) -> bool:
    """Rebuild the registry if Redis lost it; True if this call rebuilt it.

    One process rebuilds under a lock; the others wait until the epoch marker is back.
    """
    if registry.has_epoch():
        return False
    if not registry.acquire_rebuild_lock():
        deadline = time.monotonic() + wait
        while not registry.has_epoch():
            if time.monotonic() > deadline:
                raise MatchmakerError("timed out waiting for another process to rebuild Redis")
            time.sleep(0.05)
        return False
    try:
        with db.connection_context():
            allocations: dict[str, dict[str, int]] = {}
            rows = (
                Member.select(Member.session, Member.user, Member.slots)
                .join(Session)
                .where(Session.status.in_(keys.HOLDING))
            )
            for row in rows:
                allocations.setdefault(row.session_id, {})[row.user_id] = row.slots
            pending = [s.id for s in Session.select(Session.id).where(Session.status == Status.PENDING.value)]
        registry.restore(allocations)
        for session_id in pending:
            enqueue_match(queue, session_id)
        log.info(
            "registry rebuilt: %d open sessions, %d pending requeued",
            len(allocations),
            len(pending),
        )
        return True
    finally:
        registry.release_rebuild_lock()


def requeue_probes(registry: Registry, probes: Queue) -> int:
    """Queue again every probe asked for and never recorded (on matchmaker start: a
    crashed worker may have lost it). A probe already recorded is not sent twice: the
    job checks that its probe is still outstanding."""
    waiting = registry.probing()
    for user_id, subject in waiting.items():
        enqueue_probe(probes, user_id, subject)
    return len(waiting)


def requeue_pending(queue: Queue) -> int:
    """Queue a match attempt for every pending session (on matchmaker start: jobs
    may have been lost with a crashed worker or with Redis). Attempts are idempotent."""
    with db.connection_context():
        ids = [s.id for s in Session.select(Session.id).where(Session.status == Status.PENDING.value)]
    for session_id in ids:
        enqueue_match(queue, session_id)
    return len(ids)
