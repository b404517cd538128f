"""The broker's data at rest is private: no other local user (or a task on a peer that
shares the host) can read the database or the token keys."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
import redis
from falcon import testing

from broker_api.app import create_app
from broker_api.files import private_file
from broker_api.settings import Settings
from tests.helpers import signup


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def loose_umask() -> Any:
    """A permissive umask, as on many hosts: the broker must not rely on a strict one."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_default_data_directory_and_files_are_private(
    tmp_path: Path, env: dict[str, str], conn: redis.Redis, loose_umask: Any
) -> None:
    data = tmp_path / "fresh" / "broker-data"
    environ = {k: v for k, v in env.items() if k != "DATABASE_URL"}
    environ["COMPUTE_BROKER_DATA"] = str(data)
    settings = Settings.from_env(environ)
    assert settings.database_url == f"sqlite:///{data / 'broker.db'}"
    client = testing.TestClient(create_app(settings, conn=conn))
    signup(client)  # writes through SQLite's WAL

    assert _mode(tmp_path / "fresh") == 0o700
    assert _mode(data) == 0o700
    written = [p for p in data.iterdir()]
    names = {p.name for p in written}
    assert {"broker.db", "token-keys.json"} <= names
    assert "broker.db-wal" in names
    for path in written:
        assert _mode(path) == 0o600, f"{path.name} is {oct(_mode(path))}"


def test_an_existing_world_readable_database_is_tightened(tmp_path: Path, loose_umask: Any) -> None:
    db = tmp_path / "old.db"
    db.write_bytes(b"")
    db.chmod(0o644)
    wal = tmp_path / "old.db-wal"
    wal.write_bytes(b"")
    wal.chmod(0o644)
    private_file(db)
    assert _mode(db) == 0o600
    assert _mode(wal) == 0o600


def test_workers_opening_one_database_at_once_do_not_trip_over_its_sidecars(
    tmp_path: Path,
) -> None:
    """Gunicorn boots several workers that each tighten the same files; one worker's
    SQLite connection may delete -shm or -wal just as another looks at it."""
    import threading

    db = tmp_path / "shared.db"
    private_file(db)
    stop = threading.Event()
    errors: list[BaseException] = []

    def churn() -> None:
        shm = tmp_path / "shared.db-shm"
        while not stop.is_set():
            shm.write_bytes(b"")
            shm.unlink()

    def tighten() -> None:
        try:
            for _ in range(2000):
                private_file(db)
        except BaseException as exc:
            errors.append(exc)

    churner = threading.Thread(target=churn)
    churner.start()
    try:
        tighten()
    finally:
        stop.set()
        churner.join()
    assert errors == []
