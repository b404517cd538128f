"""``peer``'s public names and what importing them loads (SPEC "Installing and importing").

Each import check runs in a fresh interpreter: this test process has long since
imported the daemon through other tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import peer

ROOT = Path(__file__).resolve().parents[2]
#: Contributor-side code a requester never needs.
DAEMON_SIDE = ("peer.cli", "peer.confine", "peer.daemon", "peer.door", "peer.jail", "peer.sandbox")
SERVERS = ("broker_api", "matchmaker", "falcon", "peewee", "rq", "redis", "psycopg2")

PUBLIC = [
    "NoWorkersError",
    "PeerError",
    "Pool",
    "PoolError",
    "RemoteError",
    "TaskError",
    "Tracked",
    "WorkerLost",
]


def loaded_after(statement: str) -> list[str]:
    """The modules a fresh interpreter holds after ``statement``."""
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    ).stdout
    return json.loads(out)


def test_all_is_pinned() -> None:
    assert peer.__all__ == PUBLIC
    assert sorted(peer._EXPORTS) == PUBLIC  # every public name is loaded from somewhere


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_name_resolves(name: str) -> None:
    value = getattr(peer, name)
    assert isinstance(value, type)  # every public name is a class
    assert value is getattr(peer, name)  # cached, not looked up again
    assert name in dir(peer)


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Poole'"):
        _ = peer.Poole  # type: ignore[attr-defined]


def test_import_peer_loads_nothing_else() -> None:
    assert [m for m in loaded_after("import peer") if m.startswith("peer.")] == []


def test_requester_names_load_no_daemon_or_server_code() -> None:
    modules = loaded_after("from peer import *")
    assert [m for m in modules if m.startswith(DAEMON_SIDE) or m.split(".")[0] in SERVERS] == []
    assert "peer.pool" in modules


def test_sandbox_helpers_do_not_load_the_requester_library() -> None:
    """The daemon's slots import ``peer.tasks``; that must not drag in the pool."""
    modules = loaded_after("import peer.tasks")
    assert [m for m in modules if m.startswith("peer.")] == ["peer.tasks"]
