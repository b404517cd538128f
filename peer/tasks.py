"""Callables the requester wraps around user functions; they run inside the sandbox.

They live in an importable module (not ``__main__``) so dill pickles them by reference
and only the user's function travels by value. The daemon imports this module before
its slots drop privileges, so the sandbox can load it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


class Chunk:
    """Apply a function to a chunk of argument tuples: one task, many items.

    ``Pool.map`` sends one of these per function (once per session) and then only
    chunks of arguments, so per-item cost is a function call, not a round trip.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, items: Sequence[tuple[Any, ...]]) -> list[Any]:
        fn = self.fn
        return [fn(*args) for args in items]
