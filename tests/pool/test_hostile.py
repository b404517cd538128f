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
    if os.geteuid() != 0:
        pytest.skip("without root the sandbox cannot run tasks as another uid")  # CI runs as root
    with make_pool(3) as pool:
        for peer in peers:
            key = str(peer.home / "key.pem")
            with pytest.raises(TaskError, match="PermissionError"):
                pool.submit(read_file, key).result(30)
        assert pool.submit(abs, -3).result(30) == 3


def test_task_that_kills_its_sandbox_every_time_fails_instead_of_looping(make_pool):
    with make_pool(2) as pool:
        futures = [pool.submit(hard_exit) for _ in range(4)]
        for fut in futures:
            with pytest.raises(TaskError, match="exit"):
                fut.result(60)
        assert pool.rerun == 0
        assert pool.submit(abs, -9).result(30) == 9
