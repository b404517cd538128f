"""The daemon's front door and its memory, against a real `python -m peer serve`.

Strangers connecting and closing, sending garbage or half a hello, must not grow the
daemon: neither its threads (measured in /proc, so every OS thread counts) nor its
resident memory; meanwhile the session's own requester keeps working.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from peer import wire
from peer.pool import Pool
from peer.wire import Kind
from tests.pool.network import PeerProcess

CYCLES = 20_000
SOURCES = [f"127.0.0.{n}" for n in range(2, 6)]  # not 127.0.0.1: the requester's address


def proc_status(pid: int) -> dict[str, int]:
    """Threads and VmRSS (bytes) of a process, from /proc/<pid>/status."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key == "Threads":
                out["threads"] = int(value)
            elif key == "VmRSS":
                out["rss"] = int(value.split()[0]) * 1024
    return out


@pytest.fixture
def own_peer(stack, workdir, peers) -> Iterator[PeerProcess]:
    """A fresh 1-slot peer that the requester's pools are matched with (the shared
    peers are paused meanwhile)."""
    for p in peers:
        p.client.set_jobs(0)
    peer = PeerProcess(stack, workdir, f"door-{time.monotonic_ns()}", 1)
    try:
        yield peer
    finally:
        peer.stop()
        for p in peers:
            if p.process.proc.poll() is None:
                p.client.set_jobs(1)


def _visit(host: str, port: int, source: str, n: int) -> None:
    """One stranger's visit, of four kinds: connect and close, close with a reset,
    garbage, and half a hello."""
    sock = socket.socket()
    try:
        sock.bind((source, 0))
        sock.settimeout(5)
        sock.connect((host, port))
        kind = n % 4
        if kind == 1:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif kind == 2:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 3)
        elif kind == 3:
            sock.sendall(wire.HEADER.pack(wire.MAGIC, wire.VERSION, Kind.HELLO, 600) + b'{"session":"')
    except OSError:
        pass  # refused at a full gate, reset: all the same to a stranger
    finally:
        sock.close()


def _flood(address: str, cycles: int, workers: int = 4) -> None:
    host, port = address.rsplit(":", 1)
    counter = iter(range(cycles))
    lock = threading.Lock()

    def run(index: int) -> None:
        source = SOURCES[index % len(SOURCES)]
        while True:
            with lock:
                n = next(counter, None)
            if n is None:
                return
            _visit(host, int(port), source, n)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_connect_close_cycles_leave_threads_and_memory_flat(stack, requester: Path, own_peer: PeerProcess):
    """20,000 stranger connections (closed, reset, garbage, half a hello) leave the
    daemon's OS threads within 2 of where they were, at no point more than 3 over,
    and its RSS within 4 MiB; the session's requester runs tasks throughout."""
    pid = own_peer.process.proc.pid
    with Pool(1, home=requester, broker=stack.url, timeout=20) as pool:
        assert pool.submit(abs, -1).result(30) == 1
        _flood(own_peer.address, 1000)  # warm up the allocator and the caches
        time.sleep(0.5)
        before = proc_status(pid)
        peak = [before["threads"]]
        stop = threading.Event()
        served: list[float] = []

        def sample() -> None:
            while not stop.wait(0.02):
                peak.append(proc_status(pid)["threads"])

        def work() -> None:
            while not stop.is_set():
                started = time.monotonic()
                assert pool.submit(abs, -7).result(30) == 7
                served.append(time.monotonic() - started)
                time.sleep(0.05)

        helpers = [threading.Thread(target=sample), threading.Thread(target=work)]
        for t in helpers:
            t.start()
        started = time.monotonic()
        try:
            _flood(own_peer.address, CYCLES)
        finally:
            stop.set()
            for t in helpers:
                t.join()
        flood_seconds = time.monotonic() - started
        time.sleep(1.0)  # the last visitors' closes reach the daemon
        after = proc_status(pid)
        assert pool.submit(abs, -9).result(30) == 9
    growth = after["rss"] - before["rss"]
    print(
        f"\n{CYCLES} cycles in {flood_seconds:.1f} s; threads {before['threads']} -> {after['threads']} "
        f"(peak {max(peak)}); RSS {before['rss'] / 2**20:.1f} -> {after['rss'] / 2**20:.1f} MiB; "
        f"{len(served)} tasks served meanwhile, slowest {max(served, default=0) * 1000:.0f} ms"
    )
    assert after["threads"] <= before["threads"] + 2
    assert max(peak) <= before["threads"] + 3
    assert growth < 4 * 2**20
    assert len(served) >= 5 and max(served) < 5
