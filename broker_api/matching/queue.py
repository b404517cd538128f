"""Enqueueing matchmaker jobs: the one place that knows queue names and job options."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import redis
from rq import Queue
from rq.serializers import JSONSerializer

from broker_api.matching import keys


def match_queue(conn: redis.Redis) -> Queue:
    """The matchmaker's rq queue (JSON serializer: job arguments are only ids)."""
    return Queue(keys.QUEUE_NAME, connection=conn, serializer=JSONSerializer)


def enqueue_match(queue: Queue, session_id: str) -> None:
    """Ask the matchmaker to try to match a session now."""
    queue.enqueue(
        "matchmaker.jobs.match_session",
        session_id,
        result_ttl=60,
        failure_ttl=24 * 3600,
        description=f"match {session_id}",
    )


def schedule_deadline(queue: Queue, session_id: str, deadline: float) -> None:
    """Ask for a final attempt at a session's deadline (needs a worker running
    ``--with-scheduler``; ``python -m matchmaker`` does).

    rq stores the time as whole seconds, truncated, so it is rounded up here; the job
    also carries ``final=True`` so that it settles the session even if it runs early
    (clock skew between hosts) instead of leaving it pending with no deadline job.
    """
    queue.enqueue_at(
        datetime.fromtimestamp(math.ceil(deadline), tz=UTC),
        "matchmaker.jobs.match_session",
        session_id,
        final=True,
        result_ttl=60,
        failure_ttl=24 * 3600,
        description=f"deadline {session_id}",
    )


def request_rematch(queue: Queue) -> None:
    """Capacity grew: retry pending sessions. Bursts of calls cost one real pass,
    since the job does work only if the flag it clears was set."""
    queue.connection.set(keys.REMATCH_FLAG, "1")
    queue.enqueue("matchmaker.jobs.rematch_pending", result_ttl=0, failure_ttl=24 * 3600)


def probe_queue(conn: redis.Redis) -> Queue:
    """The address probes' rq queue (``python -m matchmaker`` serves it after matching)."""
    return Queue(keys.PROBE_QUEUE, connection=conn, serializer=JSONSerializer)


def enqueue_probe(queue: Queue, user_id: str, subject: str) -> None:
    """Ask for one probe of the address and key a peer now announces (``subject``)."""
    queue.enqueue(
        "matchmaker.probes.probe_address",
        user_id,
        subject,
        result_ttl=60,
        failure_ttl=24 * 3600,
        description=f"probe {user_id}",
    )
