"""Opening a mutually authenticated TLS channel between a requester and a peer.

Python's ``ssl`` cannot accept an unknown self-signed certificate and pin it
afterwards, so each side first shows its certificate in one bounded plain-text JSON
frame, the other side checks that certificate's public key against the pubKey the
broker has registered for that account, and only then trusts exactly that certificate
for a TLS 1.3 handshake with client certificates required (NOTES, "TLS between peers").

The exchange, before any pickle may cross::

    requester → peer   HELLO    {"session", "cert", "runtime"}            (plain, ≤ 64 KiB)
    peer              checks with the broker: the session is open, the peer is a member,
                      the cert's key is the session owner's pubKey; runtimes agree
    peer → requester   HELLO_OK {"cert", "runtime"}  or  REFUSE {"reason"}   (plain)
    requester         checks the cert's key is the worker's registered pubKey
    ======== TLS handshake, each side trusting only the certificate it was shown ========
    peer → requester   HELLO_OK {"ready": true}                          (over TLS)

The peer speaks first over TLS because in TLS 1.3 a client sees a rejection of its
certificate only on its first read.

A first frame PROBE instead of HELLO is the broker proving the peer's address
(``peer.probe``): answered with one signature, then the connection ends as refused.
"""

from __future__ import annotations

import re
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from peer import probe, wire
from peer.errors import PeerError, ProtocolError
from peer.identity import Identity, IdentityError, normalize_public_key, public_key_pem
from peer.runtime import local_runtime, mismatch
from peer.wire import Kind

HANDSHAKE_TIMEOUT = 10.0
_SESSION_ID = re.compile(r"[0-9a-f]{32}")


class Refused(PeerError):
    """The other side refused the connection; the message says why."""


@dataclass(frozen=True)
class Hello:
    """A requester's checked opening message."""

    session_id: str
    cert_pem: str
    public_key: str
    runtime: dict[str, str]


def _context(identity: Identity, trusted_cert: str, server: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(identity.cert_path, identity.key_path)
    ctx.load_verify_locations(cadata=trusted_cert)
    if server:
        # No session tickets: after the handshake only application data crosses, so a
        # reader thread and a writer thread never both drive OpenSSL's handshake state.
        ctx.num_tickets = 0
    return ctx


def _check_tls_peer(tls: ssl.SSLSocket, expected_key: str) -> None:
    der = tls.getpeercert(binary_form=True)
    if der is None or public_key_pem(ssl.DER_cert_to_PEM_cert(der)) != expected_key:
        raise ProtocolError("the TLS certificate differs from the one shown before the handshake")


def parse_hello(payload: memoryview) -> Hello:
    """Validate a HELLO's JSON without trusting any of it.

    Raises:
        ProtocolError: malformed, missing or oversized fields, or a bad certificate.
    """
    msg = wire.decode_json(payload)
    session_id, cert, runtime = msg.get("session"), msg.get("cert"), msg.get("runtime")
    if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
        raise ProtocolError("HELLO needs a session id")
    if not isinstance(cert, str):
        raise ProtocolError("HELLO needs a PEM certificate")
    if not isinstance(runtime, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and len(v) < 64 for k, v in runtime.items()
    ):
        raise ProtocolError("HELLO needs a runtime object of strings")
    try:
        key = public_key_pem(cert)
    except IdentityError as exc:
        raise ProtocolError(str(exc)) from None
    return Hello(session_id, cert, key, runtime)


def accept(
    sock: socket.socket,
    identity: Identity,
    authorize: Callable[[Hello], str | None],
    *,
    timeout: float = HANDSHAKE_TIMEOUT,
) -> tuple[ssl.SSLSocket, Hello]:
    """Peer side: authenticate and authorize a requester, then wrap ``sock`` in TLS.

    Args:
        authorize: Returns None to accept, or the reason for refusing. It runs before
            anything but the bounded JSON hello has been read.

    Raises:
        Refused: the requester was refused (it has been told why).
        ProtocolError, OSError, ssl.SSLError: the exchange failed.
    """
    sock.settimeout(timeout)
    kind, payload = wire.read_frame(sock, max_frame=wire.JSON_LIMIT)
    return answer(sock, kind, payload, identity, authorize, timeout=timeout)


def answer(
    sock: socket.socket,
    kind: Kind,
    payload: memoryview,
    identity: Identity,
    authorize: Callable[[Hello], str | None],
    *,
    timeout: float = HANDSHAKE_TIMEOUT,
) -> tuple[ssl.SSLSocket, Hello]:
    """`accept` once the first frame (at most `wire.JSON_LIMIT` bytes) has been read,
    e.g. by the daemon's front door, which reads hellos without a thread per socket.

    Raises:
        Refused, ProtocolError, OSError, ssl.SSLError: as `accept`.
    """
    sock.settimeout(timeout)
    if kind is Kind.PROBE:  # the broker proving our address: answered, then closed
        try:
            probe.answer(sock, payload, probe.signer(identity))
        except probe.Answered as exc:
            raise Refused(str(exc)) from None
    if kind is not Kind.HELLO:
        _refuse(sock, f"expected HELLO, got {kind.name}; nothing is accepted before the handshake")
    try:
        hello = parse_hello(payload)
    except ProtocolError as exc:
        _refuse(sock, str(exc))
    reason = mismatch(local_runtime(), hello.runtime) or authorize(hello)
    if reason:
        _refuse(sock, reason)
    wire.write_frame(
        sock, Kind.HELLO_OK, [wire.encode_json({"cert": identity.cert_pem, "runtime": local_runtime()})]
    )
    tls = _context(identity, hello.cert_pem, server=True).wrap_socket(sock, server_side=True)
    _check_tls_peer(tls, hello.public_key)
    wire.write_frame(tls, Kind.HELLO_OK, [wire.encode_json({"ready": True})])
    tls.settimeout(None)
    return tls, hello


def _refuse(sock: socket.socket, reason: str) -> Any:
    try:
        wire.write_frame(sock, Kind.REFUSE, [wire.encode_json({"reason": reason})])
    except OSError:
        pass
    raise Refused(reason)


def connect(
    address: str,
    identity: Identity,
    session_id: str,
    expected_key: str,
    *,
    timeout: float = HANDSHAKE_TIMEOUT,
) -> ssl.SSLSocket:
    """Requester side: open a channel to the peer at ``host:port`` for a session.

    Args:
        expected_key: The worker's pubKey as the broker listed it in the session.

    Raises:
        Refused: the peer refused (its reason is the message), or its certificate's
            key is not the registered one.
        ProtocolError, OSError, ssl.SSLError: the exchange failed.
    """
    host, _, port = address.rpartition(":")
    sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        hello = {"session": session_id, "cert": identity.cert_pem, "runtime": local_runtime()}
        wire.write_frame(sock, Kind.HELLO, [wire.encode_json(hello)])
        kind, payload = wire.read_frame(sock, max_frame=wire.JSON_LIMIT)
        msg = wire.decode_json(payload)
        if kind is Kind.REFUSE:
            raise Refused(f"peer at {address} refused: {msg.get('reason', 'no reason given')}")
        if kind is not Kind.HELLO_OK or not isinstance(msg.get("cert"), str):
            raise ProtocolError(f"peer at {address} answered {kind.name} to HELLO")
        try:
            shown = public_key_pem(msg["cert"])
        except IdentityError as exc:
            raise ProtocolError(f"peer at {address}: {exc}") from None
        if shown != normalize_public_key(expected_key):
            raise Refused(f"peer at {address} showed a certificate whose key is not its registered pubKey")
        theirs = msg.get("runtime") if isinstance(msg.get("runtime"), dict) else {}
        reason = mismatch(local_runtime(), theirs)
        if reason:
            raise Refused(f"peer at {address}: {reason}")
        tls = _context(identity, msg["cert"], server=False).wrap_socket(sock)
        _check_tls_peer(tls, shown)
        kind, payload = wire.read_frame(tls, max_frame=wire.JSON_LIMIT)
        if kind is not Kind.HELLO_OK:
            raise ProtocolError(f"peer at {address} sent {kind.name} instead of ready")
        tls.settimeout(None)
        return tls
    except BaseException:
        sock.close()
        raise


def keepalive(sock: socket.socket) -> None:
    """TCP keepalive probes after 5 s idle: a party whose host or network vanished
    without closing the connection is noticed in about 20 s, not hours."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
