"""Hostile tasks through the real daemon: each fails with a clear error, and the same
peer then runs the next task correctly."""

from __future__ import annotations

import os

import pytest

from peer.errors import TaskError


def memory_bomb():
    blocks = []
    while True:
        blocks.append(bytearray(64 * 1024 * 1024))


def endless_loop():
    while True:
        pass


def fork_bomb():
    import os as _os

    children = 0
    for _ in range(10_000):
        if _os.fork() == 0:
            import time as _time

            _time.sleep(30)
            _os._exit(0)
        children += 1
    return children


def segfault():
    import ctypes

    return ctypes.string_at(0)


def hard_exit():
    os._exit(3)


def open_socket():
    import socket

    return socket.create_connection(("1.1.1.1", 53), timeout=2).getpeername()


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


HOSTILE = {
    "memory bomb": (memory_bomb, (), "MemoryError"),
    "endless loop": (endless_loop, (), "TimeoutError"),
    "fork bomb": (fork_bomb, (), ""),
    "segfault": (segfault, (), "SIGSEGV"),
    "os._exit": (hard_exit, (), "exit"),
    "socket": (open_socket, (), ""),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_task_fails_clearly_and_the_peer_carries_on(make_pool, name):
    fn, args, words = HOSTILE[name]
    with make_pool(1) as pool:
        with pytest.raises(TaskError) as caught:
            pool.submit(fn, *args).result(60)
        assert words in str(caught.value), str(caught.value)
        assert len(str(caught.value)) < 40_000
        assert list(pool.map(abs, range(-50, 0))) == list(range(50, 0, -1))


def test_task_cannot_read_the_peers_private_key(make_pool, peers):
    """The peer's home (key, token) is not in the sandbox's view at all."""
    with make_pool(3) as pool:
        for peer in peers:
            for name in ("key.pem", "account.json"):
                path = str(peer.home / name)
                assert os.path.exists(path)  # control: there on the host
                with pytest.raises(TaskError, match="FileNotFoundError"):
                    pool.submit(read_file, path).result(30)
        assert pool.submit(abs, -3).result(30) == 3


def test_task_that_kills_its_sandbox_every_time_fails_instead_of_looping(make_pool):
    with make_pool(2) as pool:
        futures = [pool.submit(hard_exit) for _ in range(4)]
        for fut in futures:
            with pytest.raises(TaskError, match="exit"):
                fut.result(60)
        assert pool.rerun == 0
        assert pool.submit(abs, -9).result(30) == 9


def leave_traces():
    import builtins

    builtins.planted_by_another_session = "secret"
    with open("left-behind.txt", "w") as f:
        f.write("secret")
    return sorted(os.listdir("."))


def look_for_traces():
    import builtins

    return hasattr(builtins, "planted_by_another_session"), sorted(os.listdir("."))


def test_one_session_leaves_nothing_for_the_next(stack, workdir, requester, peers):
    """Two requesters in turn on the same slot: the second sees a fresh interpreter
    and an empty scratch directory, not what the first one's tasks left behind."""
    from peer.pool import Pool
    from tests.pool.network import PeerProcess, init_account

    for p in peers:
        p.client.set_jobs(0)
    shared_peer = PeerProcess(stack, workdir, "shared-slot", 1)
    other = workdir / "second-requester"
    init_account(stack, other, "second-requester@example.org")
    try:
        with Pool(1, home=requester, broker=stack.url, timeout=20) as first:
            assert first.submit(leave_traces).result(30) == ["left-behind.txt"]
            assert first.submit(look_for_traces).result(30) == (True, ["left-behind.txt"])
        with Pool(1, home=other, broker=stack.url, timeout=20) as second:
            assert second.submit(look_for_traces).result(30) == (False, [])
            assert list(second.shares) == [shared_peer.address]
    finally:
        shared_peer.stop()
        for p in peers:
            if p.process.proc.poll() is None:
                p.client.set_jobs(1)
