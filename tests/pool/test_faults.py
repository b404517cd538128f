"""Peers that die or freeze in the middle of a map: every result still arrives."""

from __future__ import annotations

import signal
import socket
import threading
import time


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
        killer = _when_started(pool, 5, lambda: victim.process.kill(signal.SIGKILL))
        data = list(range(600))
        assert list(pool.map(slow_square, data, chunksize=10)) == [x * x for x in data]
        killer.join()
        assert victim.process.proc.poll() is not None
        assert pool.rerun > 0
        assert pool.slots >= 2  # the survivors (a replacement may join too)


def test_frozen_peer_is_detected_by_silence_not_waited_on(make_pool, stack, workdir, peers):
    from tests.pool.network import PeerProcess

    for p in peers:  # two fresh peers of its own, whatever earlier tests did to these
        p.client.set_jobs(0)
    own = [PeerProcess(stack, workdir, f"frozen-{n}", 1) for n in range(2)]
    try:
        with make_pool(2, silence=3.0) as pool:
            assert pool.submit(abs, -1).result(30) == 1
            victim = next(p for p in own if p.address in pool.shares)
            freezer = _when_started(pool, 3, lambda: victim.process.kill(signal.SIGSTOP))
            try:
                started = time.monotonic()
                data = list(range(300))
                assert list(pool.map(slow_square, data, chunksize=10)) == [x * x for x in data]
                assert time.monotonic() - started < 30
                assert pool.rerun > 0
            finally:
                freezer.join()
                victim.process.kill(signal.SIGCONT)
    finally:
        for p in own:
            p.stop()
        for p in peers:
            if p.process.proc.poll() is None:
                p.client.set_jobs(1)


def test_vanished_requester_stops_holding_the_peer_after_its_lease(stack, workdir, requester, peers):
    """The requester's process dies without ending its session: after the lease the
    peer leaves the session (its slot goes back to the broker); the session record
    stays until its owner deletes it."""
    from peer.api import BrokerClient
    from peer.config import Account
    from peer.pool import Pool
    from tests.pool.network import PeerProcess

    for p in peers:  # dead ones too: the broker still lists them until their heartbeat is stale
        p.client.set_jobs(0)
    leasing = PeerProcess(stack, workdir, "leasing", 1, "--lease", "2", "--heartbeat", "0.5")
    try:
        pool = Pool(1, home=requester, broker=stack.url, timeout=20)
        assert pool.submit(abs, -2).result(30) == 2
        session_id = pool.session_id
        for link in pool._links:  # the requester vanishes: connections drop, no DELETE
            link.alive = False
            link.tls.shutdown(socket.SHUT_RDWR)  # what the kernel does when a process dies
            link.tls.close()
        pool._closed = True
        owner = BrokerClient(stack.url, Account.load(requester).token)
        deadline = time.monotonic() + 20
        while owner.session(session_id)["workers"] and time.monotonic() < deadline:
            time.sleep(0.2)
        session = owner.session(session_id)
        assert session["workers"] == [] and session["status"] in ("matched", "partial")
        assert "left it (lease)" in leasing.output()
        with Pool(1, home=requester, broker=stack.url, timeout=20) as again:  # the slot is free again
            assert again.submit(abs, -3).result(30) == 3
            assert list(again.shares) == [leasing.address]
        owner.end_session(session_id)
    finally:
        leasing.stop()
        for p in peers:
            if p.process.proc.poll() is None:
                p.client.set_jobs(1)


def test_session_ended_at_the_broker_closes_its_connections(stack, workdir, requester, peers):
    """The owner ends the session with the API while the pool is connected: the peer
    notices at its next check and stops serving that session."""
    from peer.api import BrokerClient
    from peer.config import Account
    from peer.pool import Pool
    from tests.pool.network import PeerProcess

    for p in peers:
        p.client.set_jobs(0)
    peer = PeerProcess(stack, workdir, "ending", 1, "--heartbeat", "0.5")
    try:
        pool = Pool(1, home=requester, broker=stack.url, timeout=20)
        assert pool.submit(abs, -4).result(30) == 4
        BrokerClient(stack.url, Account.load(requester).token).end_session(pool.session_id)
        peer.wait_for("no longer open at the broker", timeout=15)
        pool.shutdown(wait=False, cancel_futures=True)
    finally:
        peer.stop()
        for p in peers:
            if p.process.proc.poll() is None:
                p.client.set_jobs(1)
