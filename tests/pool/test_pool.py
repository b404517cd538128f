"""Pool over real peers: exactly the local results, in order, for every kind of callable."""

from __future__ import annotations

import dataclasses
import math
import time
from concurrent.futures import as_completed
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from peer.errors import TaskError
from peer.pool import NoWorkersError, PoolError


def square(x: int) -> int:
    return x * x


def test_map_matches_local_results_in_order(make_pool):
    with make_pool(3) as pool:
        assert pool.session_id is None  # peers are asked for on the first task
        data = list(range(1000))
        assert list(pool.map(square, data)) == [square(x) for x in data]
        assert pool.slots == 3
        assert list(pool.map(square, data, chunksize=7)) == [square(x) for x in data]
        assert list(pool.map(pow, [2, 3, 4], [5, 6, 7])) == [pow(2, 5), pow(3, 6), pow(4, 7)]
        assert sum(pool.shares.values()) > 0 and len([n for n in pool.shares.values() if n]) >= 2


def fib(n: int) -> int:
    return n if n < 2 else fib(n - 1) + fib(n - 2)


def test_lambdas_closures_and_recursion(make_pool):
    offset = 17

    def add_offset(x):
        return x + offset

    with make_pool(2) as pool:
        assert list(pool.map(lambda x: x * 3, range(50))) == [x * 3 for x in range(50)]
        assert list(pool.map(add_offset, range(50))) == [x + offset for x in range(50)]
        assert pool.submit(fib, 15).result(30) == fib(15)
        assert pool.submit(math.factorial, 20).result(30) == math.factorial(20)
        assert pool.submit(sorted, [3, 1, 2], reverse=True).result(30) == [3, 2, 1]


def test_numpy_arrays_there_and_back(make_pool):
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal((200, 300)) for _ in range(6)]
    big = rng.integers(0, 255, size=20_000_000, dtype=np.uint8)  # 20 MB, out-of-band
    with make_pool(2) as pool:
        got = list(pool.map(lambda a: a @ a.T, arrays))
        for a, g in zip(arrays, got, strict=True):
            np.testing.assert_allclose(g, a @ a.T)
        back = pool.submit(lambda a: a[::-1].copy(), big).result(60)
        assert back.dtype == np.uint8 and np.array_equal(back, big[::-1])


def test_submit_and_as_completed(make_pool):
    with make_pool(2) as pool:
        futures = {pool.submit(square, n): n for n in range(200)}
        seen = {futures[f]: f.result() for f in as_completed(futures, timeout=60)}
        assert seen == {n: n * n for n in range(200)}


def test_remote_exception_arrives_as_one_error_class_with_traceback(make_pool):
    def fails(x):
        return {"a": 1}[x]

    with make_pool(1) as pool:
        future = pool.submit(fails, "missing")
        with pytest.raises(TaskError) as caught:
            future.result(30)
        assert caught.value.type_name == "KeyError"
        assert "'missing'" in caught.value.message
        assert "in fails" in caught.value.traceback_text
        assert pool.submit(square, 4).result(30) == 16  # the pool carries on


def test_unserializable_function_fails_before_asking_for_peers(make_pool):
    generator = (x for x in range(3))  # neither pickle nor dill can serialize one
    pool = make_pool(2)
    with pytest.raises(PoolError, match="serialize"):
        pool.submit(lambda: next(generator))
    with pytest.raises(TypeError, match="pickle"):
        pool.submit(square, generator)
    with pytest.raises(TypeError, match="pickle"):
        pool.map(square, [1, generator])
    assert pool.session_id is None  # never asked the broker


def test_too_few_workers_is_a_clear_error(make_pool):
    pool = make_pool(50, min_workers=40)
    pool.timeout = 1
    started = time.monotonic()
    with pytest.raises(NoWorkersError, match="fewer than 40"):
        pool.submit(square, 1)
    assert time.monotonic() - started < 15


def test_context_exit_ends_the_session(make_pool, stack, requester):
    from peer.api import BrokerClient
    from peer.config import Account

    with make_pool(1) as pool:
        assert pool.submit(square, 3).result(30) == 9
        session_id = pool.session_id
    client = BrokerClient(stack.url, Account.load(requester).token)
    assert session_id not in {s["id"] for s in client.sessions()}


def test_progress_bar_counts_items(make_pool, capsys):
    with make_pool(2) as pool:
        assert list(pool.map(square, range(300), progress=True)) == [x * x for x in range(300)]
    err = capsys.readouterr().err
    assert "300/300" in err


def test_shutdown_without_waiting_leaves_no_future_pending(make_pool):
    import time as _time

    pool = make_pool(1)
    futures = [pool.submit(_time.sleep, 0.5) for _ in range(6)]
    pool.shutdown(wait=False)
    for fut in futures:
        try:
            fut.result(10)
        except PoolError as exc:
            assert "shut down" in str(exc)
    assert all(f.done() for f in futures)


def test_long_remote_error_messages_arrive_intact(make_pool):
    def long_error():
        raise ValueError("\x01" * 10_000)

    with make_pool(1) as pool:
        with pytest.raises(TaskError) as caught:
            pool.submit(long_error).result(30)
        assert caught.value.type_name == "ValueError" and len(caught.value.message) >= 8000
        assert pool.rerun == 0


class QuotaExceeded(Exception):
    """An exception class of the requester's own code."""


def test_builtin_exceptions_arrive_as_their_own_type_with_the_remote_traceback(make_pool):
    """``except ValueError:`` works as with ProcessPoolExecutor, and so does catching
    the requester's own exception classes; TaskError still catches them all."""
    from peer.errors import RemoteTraceback

    def fails(kind):
        if kind == "value":
            raise ValueError("bad value", 3)
        if kind == "file":
            open("/nonexistent/file")
        if kind == "own":
            raise QuotaExceeded("disk", 3)
        raise RuntimeError("custom")

    with make_pool(1) as pool:
        try:
            pool.submit(fails, "value").result(30)
        except ValueError as exc:
            assert exc.args == ("bad value", 3)
            assert isinstance(exc, TaskError)
            assert isinstance(exc.__cause__, RemoteTraceback) and "in fails" in exc.__cause__.text
        else:
            raise AssertionError("no ValueError")
        with pytest.raises(FileNotFoundError) as caught:
            pool.submit(fails, "file").result(30)
        assert caught.value.filename == "/nonexistent/file" and caught.value.errno == 2
        with pytest.raises(RuntimeError, match="RuntimeError: custom"):
            pool.submit(fails, "runtime").result(30)
        with pytest.raises(QuotaExceeded) as own:
            pool.submit(fails, "own").result(30)
        assert isinstance(own.value, TaskError) and own.value.args == ("disk", 3)


@dataclasses.dataclass
class Reading:
    sensor: str
    value: float


class Span(NamedTuple):
    start: int
    end: int


def own_values() -> list[object]:
    return [Reading("t", 21.5), Span(1, 2), Path("/srv/out.txt"), (1, {2}), ValueError("a value")]


def test_results_of_the_requesters_own_classes_come_back_as_them(make_pool):
    """The default (untrusted) decoder rebuilds this module's dataclass and NamedTuple
    by calling them, a Path as a Path, and a returned exception as itself. (Enums are
    covered in tests/peer/test_datacodec.py: dill 0.4.1 cannot send a function whose
    globals hold an Enum class by value.)"""
    with make_pool(1) as pool:
        got = pool.submit(own_values).result(30)
    expected = own_values()
    assert got[:4] == expected[:4]
    assert [type(v) for v in got] == [type(v) for v in expected]
    assert got[4].args == ("a value",)
