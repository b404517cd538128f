"""``python -m matchmaker``: an rq worker on the matchmaker queue.

It uses rq's ``SimpleWorker``, which runs jobs in its own process instead of forking
one per job: a match job takes about 1 ms of work, so a fork (10-20 ms) would dominate
the request-to-matched latency. Jobs are our own code, so the isolation a fork gives is
not needed. The worker runs rq's scheduler, which fires the deadline of requests still
short of peers.

Address probes (``matchmaker.probes``) have their own queue and their own worker, the
Procfile's ``prober`` (``--queue probes``): a probe may wait up to ``PROBE_TIMEOUT``
seconds on a silent host, and a request to be matched must never wait behind it.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import redis
from rq import SimpleWorker
from rq.serializers import JSONSerializer

from broker_api.matching import keys, recovery
from broker_api.matching.queue import match_queue, probe_queue
from broker_api.matching.registry import Registry
from broker_api.models import bind_database, create_tables
from matchmaker import jobs
from matchmaker.settings import Settings

log = logging.getLogger("matchmaker")


def connect(url: str, *, wait: float = 30.0) -> redis.Redis:
    """Connect to Redis, waiting for it to come up (it may start alongside us)."""
    conn = redis.Redis.from_url(url, socket_timeout=30, health_check_interval=30)
    deadline = time.monotonic() + wait
    while True:
        try:
            conn.ping()
            return conn
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if time.monotonic() > deadline:
                raise SystemExit(f"matchmaker: cannot reach Redis at {url}: {exc}") from None
            time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m matchmaker", description=__doc__.splitlines()[0])
    parser.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    parser.add_argument("--name", help="worker name (default: rq's)")
    parser.add_argument(
        "--queue",
        action="append",
        choices=[keys.QUEUE_NAME, keys.PROBE_QUEUE],
        help="queue to serve, in priority order; repeatable (default: matchmaker)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    settings = Settings.from_env()
    jobs.configure(settings)
    conn = connect(settings.redis_url)
    bind_database(settings.database_url)
    create_tables()
    queue = match_queue(conn)
    registry = Registry(conn, stale_after=settings.stale_after)
    recovery.ensure_registry(registry, queue)
    log.info("requeued %d pending sessions", recovery.requeue_pending(queue))
    log.info("requeued %d address probes", recovery.requeue_probes(registry, probe_queue(conn)))
    chosen = args.queue or [keys.QUEUE_NAME]
    queues = [queue if name == keys.QUEUE_NAME else probe_queue(conn) for name in chosen]
    worker = SimpleWorker(queues, connection=conn, serializer=JSONSerializer, name=args.name)
    worker.work(burst=args.burst, with_scheduler=True, logging_level="WARNING")
    return 0


if __name__ == "__main__":
    sys.exit(main())
