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
    and its RSS within 4 MiB; the session's requester runs tasks throughout and opens
    fresh connections (full handshakes) meanwhile."""
    pid = own_peer.process.proc.pid
    with Pool(1, home=requester, broker=stack.url, timeout=20) as pool:
        assert pool.submit(abs, -1).result(30) == 1
        _flood(own_peer.address, 1000)  # warm up the allocator and the caches
        time.sleep(0.5)
        before = proc_status(pid)
        peak = [before["threads"]]
        stop = threading.Event()
        served: list[float] = []
        joined: list[float] = []

        def sample() -> None:
            while not stop.wait(0.02):
                peak.append(proc_status(pid)["threads"])

        key = _worker_key(pool)

        def work() -> None:
            from peer.channel import connect

            while not stop.is_set():
                started = time.monotonic()
                assert pool.submit(abs, -7).result(30) == 7
                served.append(time.monotonic() - started)
                if len(served) % 10 == 0:  # and the requester gets in afresh
                    started = time.monotonic()
                    connect(own_peer.address, pool.identity, pool.session_id, key).close()
                    joined.append(time.monotonic() - started)
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
        f"{len(served)} tasks served meanwhile, slowest {max(served, default=0) * 1000:.0f} ms; "
        f"{len(joined)} fresh handshakes, slowest {max(joined, default=0) * 1000:.0f} ms"
    )
    assert after["threads"] <= before["threads"] + 2
    assert max(peak) <= before["threads"] + 3
    assert growth < 4 * 2**20
    assert len(served) >= 5 and max(served) < 5
    assert joined and max(joined) < 5


SESSION_MIB, HELD_MIB = 32, 48
BLOB = 4 * 2**20


def hold(seconds: float, blob: bytes) -> int:
    """A task that keeps its slot busy (and its argument held) for a while."""
    import time

    time.sleep(seconds)
    return len(blob)


def _worker_key(pool: Pool) -> str:
    (link,) = pool._links
    return next(
        w["pubKey"] for w in pool._client.session(pool.session_id)["workers"] if w["id"] == link.worker_id
    )


def _vanish(pool: Pool) -> None:
    """The requester's links drop without ending the session (as if its process died)."""
    pool._closed = True
    for link in pool._links:
        link.alive = False
        wire.close_quietly(link.tls)


def _stuff(tls, seconds: float, tasks: int, sent: list[int]) -> None:
    """Send one function and ``tasks`` TASK frames of 4 MiB each, as fast as the peer reads."""
    from peer import codec
    from peer.daemon import TASK_ID

    code = codec.dumps_code(hold)
    code_id = codec.code_id(code).encode()
    data = codec.dumps_data(((seconds, b"x" * BLOB), {}))
    try:
        wire.write_frame(tls, Kind.FUNC, wire.pack_buffers([code_id, code]))
        for n in range(tasks):
            wire.write_frame(tls, Kind.TASK, wire.pack_buffers([TASK_ID.pack(n), code_id, *data]))
            sent.append(n)
    except OSError:
        pass  # cut by the test (or the oldest, replaced by a newer connection)


@pytest.fixture
def budget_peer(stack, workdir, peers) -> Iterator[PeerProcess]:
    """A 2-slot peer holding at most 32 MiB per session and 48 MiB in all."""
    for p in peers:
        p.client.set_jobs(0)
    peer = PeerProcess(
        stack, workdir, f"budget-{time.monotonic_ns()}", 2,
        "--session-mib", str(SESSION_MIB), "--held-mib", str(HELD_MIB), "--task-timeout", "60",
    )  # fmt: skip
    try:
        yield peer
    finally:
        peer.stop()
        for p in peers:
            if p.process.proc.poll() is None:
                p.client.set_jobs(1)


def test_one_session_over_many_connections_cannot_grow_the_daemon_past_its_cap(
    stack, requester: Path, budget_peer: PeerProcess
):
    """Session A opens five connections and pushes 4 MiB tasks into each (120 MiB in
    all) while its one slot sleeps: the daemon's RSS grows by less than A's 32 MiB
    budget plus 16 MiB; session B's tasks still run meanwhile; once A's connections
    close and its running task ends, every byte is released (the log says 0.0 MiB)."""
    from peer.channel import connect

    pid = budget_peer.process.proc.pid
    first = Pool(1, home=requester, broker=stack.url, timeout=20)
    assert first.submit(abs, -1).result(30) == 1
    key = _worker_key(first)
    session_a = first.session_id
    _vanish(first)  # the session stays open; its requester now uses raw connections
    with Pool(1, home=requester, broker=stack.url, timeout=20) as second:
        assert second.submit(abs, -2).result(30) == 2
        assert second.session_id != session_a and list(second.shares) == [budget_peer.address]
        before = proc_status(pid)["rss"]
        links, senders, sent = [], [], []
        for _ in range(5):
            tls = connect(budget_peer.address, first.identity, session_a, key)
            links.append(tls)
            senders.append(threading.Thread(target=_stuff, args=(tls, 6.0, 6, sent), daemon=True))
            senders[-1].start()
        peak = before
        deadline = time.monotonic() + 5
        served = 0
        while time.monotonic() < deadline:
            peak = max(peak, proc_status(pid)["rss"])
            assert second.submit(abs, -3).result(10) == 3  # B is not held back by A
            served += 1
            time.sleep(0.2)
        growth = peak - before
        print(
            f"\nRSS {before / 2**20:.1f} -> peak {peak / 2**20:.1f} MiB; "
            f"{len(sent)} of 30 tasks sent; B ran {served}"
        )
        assert growth < (SESSION_MIB + 16) * 2**20
        assert len(sent) < 30  # the rest waits on the requester's side (backpressure)
        assert "closing the oldest" in budget_peer.output()
        for tls in links:
            wire.close_quietly(tls)
        for thread in senders:
            thread.join(10)
        # A's running task ends within its 6 s; then nothing is held for anyone.
        deadline = time.monotonic() + 20
        while True:
            with connect(budget_peer.address, second.identity, second.session_id, _worker_key(second)):
                pass
            time.sleep(0.3)
            last = [line for line in budget_peer.output().splitlines() if "disconnected after" in line][-1]
            if "0.0 of 48 MiB in all" in last or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert "0.0 of 48 MiB in all" in last, last
        assert second.submit(abs, -4).result(30) == 4
    first._client.end_session(session_a)


def test_a_task_larger_than_the_session_budget_fails_clearly(
    stack, requester: Path, budget_peer: PeerProcess
):
    """Refused from its header, read past without being held; the connection goes on."""
    with Pool(1, home=requester, broker=stack.url, timeout=20) as pool:
        with pytest.raises(Exception, match="per-session budget of 32 MiB"):
            pool.submit(len, b"x" * (SESSION_MIB + 8) * 2**20).result(60)
        assert pool.submit(len, b"x" * 2**20).result(30) == 2**20
        assert pool.rerun == 0


def test_an_honest_job_bigger_than_the_session_budget_still_runs(
    stack, requester: Path, budget_peer: PeerProcess
):
    """Backpressure, not failure: 16 tasks of 6 MiB submitted at once (the pool keeps 8
    in flight, 48 MiB, over the session's 32 MiB) all complete, none re-run, and
    nothing is left held."""
    with Pool(1, home=requester, broker=stack.url, timeout=20) as pool:
        blobs = [bytes([n]) * 6 * 2**20 for n in range(16)]
        futures = [pool.submit(len, blob) for blob in blobs]
        assert [f.result(60) for f in futures] == [6 * 2**20] * 16
        assert pool.rerun == 0
    budget_peer.wait_for("0.0 of 48 MiB in all", timeout=20)
