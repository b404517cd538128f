"""Who may talk to a peer, and what a hostile party on either side can achieve.

Each refusal is checked with a payload whose unpickling would create a file: the file
must not exist afterwards, proving nothing was deserialized.
"""

from __future__ import annotations

import pickle
import secrets
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest

from peer import codec, probe, wire
from peer.api import BrokerClient
from peer.channel import Refused, accept, connect
from peer.config import Account
from peer.daemon import TASK_ID
from peer.errors import PeerError, UnsafeResultError
from peer.identity import Identity
from peer.runtime import local_runtime
from peer.wire import Kind
from scripts.stack import free_port
from tests.pool.network import PASSWORD


class CreatesFile:
    """Unpickling this creates ``path``: the tripwire for any deserialization."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def tripwire(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "unpickled"
    return path, pickle.dumps(CreatesFile(path), protocol=5)


@pytest.fixture
def session(make_pool):
    """A live pool (its session is open and matched with one peer) for its identity."""
    pool = make_pool(1)
    assert pool.submit(abs, -1).result(30) == 1
    (link,) = pool._links
    return pool, link


def _hello(address: str, session_id: str, cert_pem: str, runtime=None) -> tuple[Kind, dict]:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        body = {"session": session_id, "cert": cert_pem, "runtime": runtime or local_runtime()}
        wire.write_frame(sock, Kind.HELLO, [wire.encode_json(body)])
        kind, payload = wire.read_frame(sock, max_frame=wire.JSON_LIMIT)
        return kind, wire.decode_json(payload)


def test_no_session_is_refused(session, tmp_path):
    pool, link = session
    kind, msg = _hello(link.address, "0" * 32, pool.identity.cert_pem)
    assert kind is Kind.REFUSE and "no such session" in msg["reason"]


def test_someone_elses_key_is_refused(session, tmp_path):
    pool, link = session
    stranger = Identity.create(tmp_path / "stranger")
    kind, msg = _hello(link.address, pool.session_id, stranger.cert_pem)
    assert kind is Kind.REFUSE and "owner's registered pubKey" in msg["reason"]
    with pytest.raises(Refused, match="owner's registered pubKey"):
        connect(link.address, stranger, pool.session_id, _worker_key(pool, link))


def _worker_key(pool, link) -> str:
    return next(
        w["pubKey"] for w in pool._client.session(pool.session_id)["workers"] if w["id"] == link.worker_id
    )


def test_a_session_the_caller_does_not_own_is_refused(session, stack, tmp_path):
    """Another account, with its own registered key, tries to ride on the session."""
    pool, link = session
    other = Identity.create(tmp_path / "other")
    client = BrokerClient(stack.url, identity=other)
    client.signup("other@example.org", PASSWORD, other.public_key, "127.0.0.1:9")
    with pytest.raises(Refused, match="owner's registered pubKey"):
        connect(link.address, other, pool.session_id, _worker_key(pool, link))


def test_runtime_mismatch_is_refused_naming_both_versions(session):
    pool, link = session
    runtime = {**local_runtime(), "python": "2.7.18"}
    kind, msg = _hello(link.address, pool.session_id, pool.identity.cert_pem, runtime)
    assert kind is Kind.REFUSE
    assert "2.7.18" in msg["reason"] and local_runtime()["python"] in msg["reason"]


def test_pickle_before_the_handshake_is_refused_unread(session, tmp_path):
    pool, link = session
    path, evil = tripwire(tmp_path)
    host, port = link.address.rsplit(":", 1)
    # As a FUNC frame, as a TASK frame, and as raw bytes with no framing at all.
    for kind in (Kind.FUNC, Kind.TASK):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            wire.write_frame(sock, kind, wire.pack_buffers([b"x" * 32, evil]))
            got, payload = wire.read_frame(sock, max_frame=wire.JSON_LIMIT)
            assert got is Kind.REFUSE and "before the handshake" in wire.decode_json(payload)["reason"]
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(evil)
        sock.shutdown(socket.SHUT_WR)
        try:
            reply = sock.recv(65536)
        except ConnectionResetError:
            reply = b""
        assert reply == b""  # not a frame at all: the peer hangs up without answering
    assert not path.exists()
    assert pool.submit(abs, -5).result(30) == 5  # and the peer is fine


def test_oversized_hello_is_refused_before_allocation(session):
    _, link = session
    host, port = link.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(wire.HEADER.pack(wire.MAGIC, wire.VERSION, Kind.HELLO, 2**40))
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            data = b""
        assert len(data) < 65536


class FakePeer:
    """A peer that the broker matches like any other, but which answers every task
    with a chosen result and may show a certificate other than its registered one."""

    def __init__(self, stack, tmp_path: Path, result: list[bytes], shown: Identity | None = None) -> None:
        self.identity = Identity.create(tmp_path / "fake")
        self.shown = shown or self.identity
        self.listener = socket.create_server(("127.0.0.1", free_port()))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.client = BrokerClient(stack.url, identity=self.identity)
        self.client.signup(f"fake-{id(self)}@example.org", PASSWORD, self.identity.public_key, self.address)
        self.client.set_jobs(1, local_runtime())
        self.result = result
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            try:
                # The broker's address probe is answered with the registered key (this
                # host holds it); only requesters are shown the other certificate.
                header = sock.recv(wire.HEADER.size, socket.MSG_PEEK | socket.MSG_WAITALL)
                if len(header) == wire.HEADER.size and header[5] == Kind.PROBE:
                    kind, payload = wire.read_frame(sock, max_frame=wire.JSON_LIMIT)
                    probe.answer(sock, payload, probe.signer(self.identity))
                tls, _ = accept(sock, self.shown, lambda hello: None)
                while True:
                    kind, payload = wire.read_frame(tls)
                    if kind is Kind.PING:
                        wire.write_frame(tls, Kind.PONG, [payload])
                    elif kind is Kind.TASK and self.result:
                        task_id = bytes(wire.unpack_buffers(payload)[0])
                        wire.write_frame(tls, Kind.RESULT, wire.pack_buffers([task_id, *self.result]))
            except (PeerError, OSError, ssl.SSLError):
                sock.close()

    def close(self) -> None:
        self.client.set_jobs(0)
        self.listener.close()


@pytest.fixture
def lone_pool(stack, requester, peers):
    """A pool whose only candidate worker is the fake peer: the real peers are paused."""
    for peer in peers:
        peer.client.set_jobs(0)
    made = []

    def make(**kwargs):
        from peer.pool import Pool

        pool = Pool(1, home=requester, broker=stack.url, timeout=10, **kwargs)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        pool.shutdown(wait=False, cancel_futures=True)
    for peer in peers:
        peer.client.set_jobs(1, local_runtime())


def test_malicious_result_does_not_run_code_on_the_requester(stack, lone_pool, tmp_path):
    path, evil = tripwire(tmp_path)
    # A pickle labelled as a result that could not travel as data (what the sandbox
    # sends for such results): only a requester that trusts its peers unpickles it.
    fake = FakePeer(stack, tmp_path, [codec.CODE, b"CreatesFile", codec.PICKLE, evil])
    try:
        pool = lone_pool()
        with pytest.raises(UnsafeResultError, match=r"CreatesFile.*trust_results=True"):
            pool.submit(abs, -1).result(30)
        assert not path.exists()
        pool.shutdown()
        # The control: a requester that opts in to trusting results does unpickle it,
        # so the tripwire would have fired had the default decoder let it through.
        trusting = lone_pool(trust_results=True)
        trusting.submit(abs, -1).result(30)
        assert path.exists()
    finally:
        fake.close()


def test_peer_showing_a_certificate_not_matching_its_registered_key_is_refused(stack, lone_pool, tmp_path):
    impostor = Identity.create(tmp_path / "impostor")
    fake = FakePeer(stack, tmp_path, codec.dumps_result(1), shown=impostor)
    try:
        pool = lone_pool()
        from peer.pool import NoWorkersError

        with pytest.raises(NoWorkersError, match="not its registered pubKey"):
            pool.submit(abs, -1).result(30)
    finally:
        fake.close()


def test_requester_account_file_is_private(requester):
    assert (requester / "key.pem").stat().st_mode & 0o777 == 0o600
    assert (requester / "account.json").stat().st_mode & 0o777 == 0o600
    assert Account.load(requester).email == "requester@example.org"
    assert TASK_ID.size == 8


def test_a_peer_that_answers_pings_but_withholds_results_is_given_up(stack, lone_pool, tmp_path):
    from peer.pool import PoolError

    fake = FakePeer(stack, tmp_path, [])  # answers PING, never a task
    try:
        pool = lone_pool(task_timeout=2.0, max_tries=1, silence=1.0)
        started = time.monotonic()
        with pytest.raises(PoolError):
            pool.submit(abs, -1).result(30)
        assert time.monotonic() - started < 15
    finally:
        fake.close()


def test_made_up_session_ids_cost_the_broker_little(session, tmp_path):
    """A stranger sending hellos with made-up session ids gets at most
    `Authorizer.LOOKUPS_PER_SOURCE` broker lookups per window; the live session's
    requester, already granted, still gets in."""
    from peer.daemon import Authorizer

    pool, link = session
    reasons = [
        _hello(link.address, secrets.token_hex(16), pool.identity.cert_pem)[1]["reason"] for _ in range(48)
    ]
    looked_up = sum("no such session" in r for r in reasons)
    throttled = sum("too many unknown sessions" in r for r in reasons)
    assert looked_up <= Authorizer.LOOKUPS_PER_SOURCE
    assert looked_up + throttled == 48 and throttled >= 48 - Authorizer.LOOKUPS_PER_SOURCE
    assert pool.submit(abs, -3).result(30) == 3
    time.sleep(Authorizer.LOOKUP_WINDOW)  # let later tests from this address start afresh


class _CountingClient(BrokerClient):
    """The real broker client, counting the session lookups it makes."""

    lookups = 0

    def session(self, session_id, *, wait=0.0):
        self.lookups += 1
        return super().session(session_id, wait=wait)


def test_a_refused_session_is_remembered_briefly(stack, peers):
    from peer.daemon import Authorizer

    client = _CountingClient(stack.url, peers[0].client.token)
    authorizer = Authorizer(client)
    unknown = secrets.token_hex(16)
    for _ in range(20):
        assert "no such session" in authorizer.grant(unknown, source="203.0.113.9")
    assert client.lookups == 1
    assert "no such session" in authorizer.grant(unknown, fresh=True)
    assert client.lookups == 2


def test_idle_handshakes_from_one_source_cannot_lock_out_the_requester(session):
    """70 half-open connections from one address (more than the daemon's global cap)
    take at most `MAX_HANDSHAKES_PER_SOURCE` places; the session's own requester,
    from another address, still connects and runs a task at once."""
    from peer.daemon import MAX_HANDSHAKES, MAX_HANDSHAKES_PER_SOURCE

    pool, link = session
    host, port = link.address.rsplit(":", 1)
    idle = []
    try:
        for _ in range(MAX_HANDSHAKES + 6):
            sock = socket.socket()
            sock.bind(("127.0.0.2", 0))
            sock.connect((host, int(port)))
            idle.append(sock)
        time.sleep(0.5)
        still_open = 0
        for sock in idle:
            sock.settimeout(0.05)
            try:
                still_open += sock.recv(1) != b""
            except TimeoutError:
                still_open += 1  # the daemon is still waiting for this one's hello
            except OSError:
                pass
        assert still_open <= MAX_HANDSHAKES_PER_SOURCE
        started = time.monotonic()
        tls = connect(link.address, pool.identity, pool.session_id, _worker_key(pool, link))
        assert time.monotonic() - started < 5
        tls.close()
    finally:
        for sock in idle:
            sock.close()
