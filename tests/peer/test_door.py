"""The front door's handshake gate: global and per-source places."""

from __future__ import annotations

import pytest

from peer.door import Gate


def test_one_source_cannot_take_every_place() -> None:
    gate = Gate(total=4, per_source=2)
    assert gate.enter("a") is None and gate.enter("a") is None
    assert "from a" in (gate.enter("a") or "")
    assert gate.enter("b") is None and gate.enter("c") is None
    assert gate.enter("d") == "too many handshakes in progress"
    gate.leave("a")
    assert gate.enter("d") is None
    assert gate.in_progress() == 4


def test_places_come_back_and_sources_are_forgotten() -> None:
    gate = Gate(total=3, per_source=3)
    for _ in range(1000):
        assert gate.enter("x") is None
        gate.leave("x")
    assert gate.in_progress() == 0 and not gate._open


def test_nonsense_caps_are_refused() -> None:
    with pytest.raises(ValueError):
        Gate(total=2, per_source=3)
