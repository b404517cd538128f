"""rq jobs: importable functions taking ids, run by ``python -m matchmaker``.

``match_session`` is idempotent: a duplicated, retried or concurrent run of the same
session gets the same reservation back from the registry and at most one run records
it, because the status moves from ``pending`` only by a conditional update.
"""

from __future__ import annotations

import logging
import time

import peewee
from rq import Queue, get_current_job

from broker_api.matching import keys, recovery
from broker_api.matching.keys import Status
from broker_api.matching.queue import match_queue, schedule_deadline
from broker_api.matching.registry import Registry, RegistryLost, runtime_bucket
from broker_api.models import Member, Session, db
from matchmaker.settings import Settings

log = logging.getLogger(__name__)

_settings: Settings | None = None


def configure(settings: Settings) -> None:
    """Set the settings jobs use (the worker's entry point, or a test, calls this)."""
    global _settings
    _settings = settings


def _current() -> Settings:
    global _settings
    if _settings is None:
        _settings = Settings.from_env()
    return _settings


def settings() -> Settings:
    """The settings jobs use (configured, or read from the environment once)."""
    return _current()


def _context() -> tuple[Registry, Queue]:
    settings = _current()
    job = get_current_job()
    if job is None:
        raise RuntimeError("matchmaker jobs run inside an rq worker")
    return Registry(job.connection, stale_after=settings.stale_after), match_queue(job.connection)


def match_session(session_id: str, final: bool = False) -> str:
    """Try to match one pending session; returns its status afterwards. ``final`` is
    the deadline's run: it settles the session as ``partial`` or ``failed``."""
    registry, queue = _context()
    with db.connection_context():
        return attempt(registry, queue, session_id, final=final)


def rematch_pending() -> int:
    """Retry every pending session after capacity grew, taking accounts in turn.

    Sessions are ordered round-robin across their owners (each account's oldest first,
    then each one's second oldest, ...), so freed slots are shared between accounts
    instead of going to whichever account queued the most requests first.

    Returns how many sessions left ``pending``. Does nothing when another run already
    consumed the flag set by ``request_rematch``.
    """
    registry, queue = _context()
    if not registry.conn.getdel(keys.REMATCH_FLAG):
        return 0
    done = 0
    with db.connection_context():
        for session_id in fair_order(registry.pending()):
            if attempt(registry, queue, session_id) != Status.PENDING.value:
                done += 1
    return done


def fair_order(pending: list[str]) -> list[str]:
    """Pending session ids (oldest first) interleaved across their owners."""
    owners: dict[str, str] = {}
    for start in range(0, len(pending), 500):
        chunk = pending[start : start + 500]
        for sid, owner in Session.select(Session.id, Session.owner).where(Session.id.in_(chunk)).tuples():
            owners[sid] = owner
    queues: dict[str, list[str]] = {}
    for sid in pending:
        queues.setdefault(owners.get(sid, ""), []).append(sid)
    out: list[str] = []
    rounds = [iter(q) for q in queues.values()]
    while rounds:
        alive = []
        for it in rounds:
            sid = next(it, None)
            if sid is not None:
                out.append(sid)
                alive.append(it)
        rounds = alive
    return out


def held_by(owner_id: str) -> int:
    """Slots the open sessions of one account hold now."""
    total = (
        Member.select(peewee.fn.COALESCE(peewee.fn.SUM(Member.slots), 0))
        .join(Session)
        .where(Session.owner == owner_id, Session.status.in_(keys.HOLDING))
        .scalar()
    )
    return int(total or 0)


def attempt(
    registry: Registry, queue: Queue, session_id: str, *, final: bool = False, _retry: bool = True
) -> str:
    """One matching attempt for a session (the body of ``match_session``)."""
    session = Session.get_or_none(Session.id == session_id)
    if session is None or session.status != Status.PENDING.value:
        registry.unpend(session_id)
        return session.status if session else Status.CLOSED.value
    now = time.time()
    final = final or now >= session.deadline
    runtime = session.runtime_dict
    buckets = [runtime_bucket(runtime)] if runtime else registry.buckets()
    # Fair use: an account's sessions hold at most ``max_held_slots`` at once, so one
    # large request cannot take every free slot; it is matched with what fits.
    room = _current().max_held_slots - held_by(session.owner_id)
    need = min(session.workers, room)
    try:
        reserved = (
            registry.reserve(
                session_id,
                requester=session.owner_id,
                buckets=buckets,
                need=need,
                minimum=session.min_workers if final else need,
                now=now,
            )
            if need >= session.min_workers
            else {}
        )
    except RegistryLost:
        recovery.ensure_registry(registry, queue)
        if not _retry:
            raise
        return attempt(registry, queue, session_id, final=final, _retry=False)

    if not reserved:
        if final:
            _finish(registry, session_id, Status.FAILED)
            return Status.FAILED.value
        if registry.pend(session_id, session.created_at):
            schedule_deadline(queue, session_id, session.deadline)
        return Status.PENDING.value

    status = Status.MATCHED if sum(reserved.values()) >= session.workers else Status.PARTIAL
    try:
        with db.atomic():
            moved = (
                Session.update(status=status.value, updated_at=now)
                .where(Session.id == session_id, Session.status == Status.PENDING.value)
                .execute()
            )
            if moved:
                Member.insert_many(
                    [{"session": session_id, "user": uid, "slots": n} for uid, n in reserved.items()]
                ).execute()
    except peewee.IntegrityError:
        # A reserved peer's account was deleted meanwhile: give the slots back and
        # try again with the peers that remain.
        log.warning("session %s: a reserved peer vanished; retrying", session_id)
        registry.release(session_id)
        if not _retry:
            raise
        return attempt(registry, queue, session_id, final=final, _retry=False)
    if not moved:
        current = Session.get_or_none(Session.id == session_id)
        if current is None or current.status not in keys.HOLDING:
            registry.release(session_id)
        registry.unpend(session_id)
        return current.status if current else Status.CLOSED.value
    registry.unpend(session_id)
    registry.conn.publish(keys.session_channel(session_id), status.value)
    log.info("session %s %s with %s", session_id, status.value, reserved)
    return status.value


def _finish(registry: Registry, session_id: str, status: Status) -> None:
    moved = (
        Session.update(status=status.value, updated_at=time.time())
        .where(Session.id == session_id, Session.status == Status.PENDING.value)
        .execute()
    )
    registry.unpend(session_id)
    if moved:
        registry.conn.publish(keys.session_channel(session_id), status.value)
