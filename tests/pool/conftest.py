"""A broker stack and three 1-slot peers shared by the module's tests, plus a
requester account. Everything is real: gunicorn, matchmaker, Redis, TLS sockets,
peer daemons with sandboxed slots."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from peer.pool import Pool
from scripts.stack import LocalStack
from tests.pool.network import PeerProcess, init_account


@pytest.fixture(scope="module")
def stack() -> Iterator[LocalStack]:
    with LocalStack(env={"SCRYPT_N": "1024", "HEARTBEAT_INTERVAL": "5"}) as running:
        yield running


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("peers")


@pytest.fixture(scope="module")
def peers(stack: LocalStack, workdir: Path) -> Iterator[list[PeerProcess]]:
    started: list[PeerProcess] = []
    try:
        for n in range(3):
            started.append(PeerProcess(stack, workdir, f"peer{n}"))
        yield started
    finally:
        for peer in started:
            peer.stop()


@pytest.fixture(scope="module")
def requester(stack: LocalStack, workdir: Path) -> Path:
    """Home directory of a requester account (key pair + credentials)."""
    home = workdir / "requester"
    init_account(stack, home, "requester@example.org")
    return home


@pytest.fixture
def make_pool(stack: LocalStack, requester: Path, peers: list[PeerProcess]) -> Iterator[Callable[..., Pool]]:
    pools: list[Pool] = []

    def make(workers: int = 2, **kwargs: object) -> Pool:
        pool = Pool(workers, home=requester, broker=stack.url, timeout=20, **kwargs)  # type: ignore[arg-type]
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.shutdown(wait=False, cancel_futures=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Peer tests use their own stack (SQLite in its data dir), so the PostgreSQL run
    of CI (``-m "not slow"``) would only repeat them: mark them slow."""
    for item in items:
        if "tests/pool/" in str(item.fspath):
            item.add_marker(pytest.mark.slow)
