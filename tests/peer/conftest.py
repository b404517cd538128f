"""Fixtures for peer tests: sandbox slots that are always closed, and a task runner."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from peer import codec
from peer.sandbox import Limits, Slot


def address_space() -> int:
    """Bytes mapped by this process; a forked sandbox starts with the same mappings."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def test_limits(**overrides: Any) -> Limits:
    """Limits small enough for bombs to hit quickly, large enough for the forked test process."""
    values: dict[str, Any] = {
        "memory": address_space() + 512 * 1024**2,
        "cpu_seconds": 20,
        "nproc": 16,
        "nofile": 64,
        "fsize": 1024**2,
        "timeout": 10.0,
    }
    return Limits(**{**values, **overrides})


@pytest.fixture
def make_slot(tmp_path: Path) -> Iterator[Callable[..., Slot]]:
    """Build slots on distinct indexes (so distinct uids) and close them after the test."""
    slots: list[Slot] = []

    def make(index: int = 0, **overrides: Any) -> Slot:
        slot = Slot(test_limits(**overrides), index, tmp_path / "scratch")
        slots.append(slot)
        return slot

    yield make
    for slot in slots:
        slot.close()


@pytest.fixture
def slot(make_slot: Callable[..., Slot]) -> Slot:
    return make_slot()


def run(slot: Slot, fn: Callable[..., Any], *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` in ``slot`` the way the daemon does, decoding as a requester."""
    code = codec.dumps_code(fn)
    buffers = slot.run(codec.code_id(code), code, codec.dumps_data((args, kwargs)), timeout=timeout)
    return codec.loads_data(buffers, trusted=False)
