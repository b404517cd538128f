"""Shared fixtures: a private redis-server, a fresh database, the app and a worker.

Tests never touch the machine's shared Redis: a session-scoped ``redis-server`` runs
on a free port and is flushed around each test. The database is SQLite in ``tmp_path``
unless ``TEST_DATABASE_URL`` points at PostgreSQL, whose tables are then dropped and
recreated for each test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from falcon import testing
from rq import SimpleWorker
from rq.serializers import JSONSerializer

from broker_api.app import create_app
from broker_api.matching.queue import match_queue, probe_queue
from broker_api.models import MODELS, bind_database, db
from broker_api.settings import Settings
from matchmaker import jobs
from matchmaker.settings import Settings as MatchmakerSettings
from scripts.stack import free_port
from tests import listeners
from tests.openapi_check import ResponseChecker


class RedisServer:
    """A throwaway ``redis-server`` on a free loopback port, owned by the tests."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            from matchmaker.local_redis import redis_server_binary

            binary = redis_server_binary()
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--maxclients", "2000"],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(10)

    def restart_empty(self) -> None:
        """Kill and restart on the same port: Redis comes back with no data."""
        if self.proc:
            self.proc.kill()
            self.proc.wait(10)
        self.start()


@pytest.fixture(autouse=True)
def _close_listeners() -> Iterator[None]:
    """Close the probe responders and victims a test opened (``tests.listeners``)."""
    yield
    listeners.close_all()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def conn(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield client
    client.flushall()
    client.close()


@pytest.fixture
def database_url(tmp_path: Path) -> Iterator[str]:
    url = os.environ.get("TEST_DATABASE_URL") or f"sqlite:///{tmp_path / 'broker.db'}"
    bind_database(url)
    with db.connection_context():
        db.drop_tables(MODELS, safe=True, cascade=not url.startswith("sqlite"))
    yield url
    if not db.is_closed():
        db.close()


@pytest.fixture
def env(tmp_path: Path, redis_server: RedisServer, database_url: str) -> dict[str, str]:
    """Environment for processes of the stack under test (gunicorn, matchmakers)."""
    return {
        **os.environ,
        "COMPUTE_BROKER_DATA": str(tmp_path / "data"),
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_server.url,
        "SCRYPT_N": "1024",
        "HEARTBEAT_INTERVAL": "10",
        "PROBE_PRIVATE_ADDRESSES": "1",  # test peers listen on loopback
    }


@pytest.fixture
def settings(env: dict[str, str], conn: redis.Redis) -> Settings:
    return Settings.from_env(env)


@pytest.fixture
def app(settings: Settings, conn: redis.Redis, env: dict[str, str]) -> Any:
    jobs.configure(MatchmakerSettings.from_env(env))
    return create_app(settings, conn=conn)


@pytest.fixture
def client(app: Any) -> ResponseChecker:
    """A TestClient that checks every response against ``/openapi.json``."""
    return ResponseChecker(testing.TestClient(app))


@pytest.fixture
def run_probes(conn: redis.Redis, app: Any) -> Callable[[], None]:
    """Run only the address probes' queue to empty in this process (a prober's work)."""

    def run() -> None:
        queue = probe_queue(conn)
        SimpleWorker([queue], connection=conn, serializer=JSONSerializer).work(
            burst=True, logging_level="WARNING"
        )
        assert queue.failed_job_registry.count == 0

    return run


@pytest.fixture
def run_matchmaker(conn: redis.Redis, app: Any) -> Callable[..., None]:
    """Run the address probes, then the matchmaker queue, to empty in this process (rq's
    SimpleWorker, burst); fails the test if any job failed. Probes first: peers that
    offered slots before a request are proven (as a running prober would have done)
    before it is matched."""

    def run(*, with_scheduler: bool = False) -> None:
        queues = [probe_queue(conn), match_queue(conn)]
        worker = SimpleWorker(queues, connection=conn, serializer=JSONSerializer)
        worker.work(burst=True, with_scheduler=with_scheduler, logging_level="WARNING")
        for queue in queues:
            failed = queue.failed_job_registry
            assert failed.count == 0, [queue.fetch_job(j).exc_info for j in failed.get_job_ids()]

    return run
