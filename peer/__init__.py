"""Compute Broker peer: the contributor daemon, its sandbox, and the requester library.

Requesters write ``from peer import Pool, RemoteError, Tracked``. The names below are
loaded on first use (PEP 562), so ``import peer`` costs nothing, ``from peer import Pool``
loads the requester's modules only (no daemon, sandbox or confinement code), and a
sandbox that imports ``peer.tasks`` does not pull in the requester library.
``tests/peer/test_package.py`` pins ``__all__`` and these import rules.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peer.errors import PeerError, TaskError
    from peer.pool import NoWorkersError, Pool, PoolError, RemoteError, WorkerLost
    from peer.tracked import Tracked

#: Public name -> the module that defines it.
_EXPORTS = {
    "NoWorkersError": "peer.pool",
    "PeerError": "peer.errors",
    "Pool": "peer.pool",
    "PoolError": "peer.pool",
    "RemoteError": "peer.pool",
    "TaskError": "peer.errors",
    "Tracked": "peer.tracked",
    "WorkerLost": "peer.pool",
}

__all__ = [
    "NoWorkersError",
    "PeerError",
    "Pool",
    "PoolError",
    "RemoteError",
    "TaskError",
    "Tracked",
    "WorkerLost",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'peer' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
