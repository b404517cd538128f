"""Peers that die or freeze in the middle of a map: every result still arrives."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest


def slow_square(x: int) -> int:
    import time as _time

    _time.sleep(0.01)
    return x * x


def _when_started(pool, n_done: int, action) -> threading.Thread:
    def run() -> None:
        deadline = time.monotonic() + 30
        while sum(pool.shares.values()) < n_done and time.monotonic() < deadline:
            time.sleep(0.01)
        action()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_peer_killed_mid_map_loses_no_result(make_pool, peers):
    with make_pool(3) as pool:
        assert pool.submit(abs, -1).result(30) == 1  # connected to all three
        victim = next(p for p in peers if p.address in pool.shares)
        killer = _when_started(pool, 5, lambda: os.killpg(victim.process.proc.pid, signal.SIGKILL))
        data = list(range(600))
        assert list(pool.map(slow_square, data, chunksize=10)) == [x * x for x in data]
        killer.join()
        assert victim.process.proc.poll() is not None
        assert pool.rerun > 0
        assert pool.slots >= 2  # the survivors (a replacement may join too)


def test_frozen_peer_is_detected_by_silence_not_waited_on(make_pool, peers):
    alive = [p for p in peers if p.process.proc.poll() is None]
    if len(alive) < 2:
        pytest.skip("needs two live peers")  # the previous test killed one of three
    with make_pool(2, silence=3.0) as pool:
        assert pool.submit(abs, -1).result(30) == 1
        victim = next(p for p in alive if p.address in pool.shares)
        pgid = victim.process.proc.pid
        freezer = _when_started(pool, 3, lambda: os.killpg(pgid, signal.SIGSTOP))
        try:
            started = time.monotonic()
            data = list(range(300))
            assert list(pool.map(slow_square, data, chunksize=10)) == [x * x for x in data]
            assert time.monotonic() - started < 30
            assert pool.rerun > 0
        finally:
            freezer.join()
            os.killpg(pgid, signal.SIGCONT)
