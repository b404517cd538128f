"""Address probes: how a host proves to the broker that it answers at its address.

Before the broker hands a host's ``host:port`` to any requester, it connects there and
asks the host to sign a fresh challenge with its registered key, so that an account
cannot make requesters connect to a machine it does not control. The exchange is the
first frame of a connection to the daemon's front door, in place of a HELLO::

    broker → host   PROBE     {"challenge": 43 base64url chars, "address": "host:port"}  (≤ 512 B)
    host → broker   PROBE_OK  {"signature": base64}                                     then closes

The host signs exactly ``message(challenge, address)``: a fixed domain-separation tag,
the challenge and the address it was reached at (as the broker dialled it), each
checked against a strict format first. The tag differs from the first line of every
other message our keys sign (``compute-broker/v1`` key challenges, TLS's own context
strings), so whoever sends probes gets signatures that prove nothing but "the holder of
this key answered a probe at this address"; it can never turn the host into a signing
oracle for a log-in or a key change. A probe costs the host one bounded read and one
ECDSA signature, and it takes a place in the front door's per-source handshake gate
like any hello.

Both sides live here, so the format is defined once: `answer` (the daemon, through
`peer.channel.accept`) and `ask` (the broker's probe job).
"""

from __future__ import annotations

import base64
import re
import socket
from collections.abc import Callable

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from peer import wire
from peer.errors import PeerError, ProtocolError
from peer.identity import Identity, IdentityError
from peer.wire import Kind

__all__ = ["TAG", "Answered", "answer", "ask", "message", "signer"]

#: First line of every probe signature; no other message our keys sign starts with it.
TAG = "compute-broker/address-probe/v1"
#: Largest PROBE or PROBE_OK payload either side reads.
MAX_PAYLOAD = 512
CHALLENGE = re.compile(r"[A-Za-z0-9_-]{43}")
ADDRESS = re.compile(r"(\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9.-]{1,253}):[0-9]{1,5}")
_SIGNATURE = re.compile(r"[A-Za-z0-9+/]{1,200}={0,2}")

#: Signs the bytes of a probe message with the host's key; returns the raw signature.
Signer = Callable[[bytes], bytes]


class Answered(PeerError):
    """The connection was an address probe and has been answered; close it."""


def message(challenge: str, address: str) -> bytes:
    """The exact bytes a host signs to answer a probe of ``address`` with ``challenge``.

    Raises:
        ProtocolError: the challenge or address is not in its strict format.
    """
    if not CHALLENGE.fullmatch(challenge):
        raise ProtocolError("PROBE needs a 43-character base64url challenge")
    if not ADDRESS.fullmatch(address):
        raise ProtocolError("PROBE needs the address as host:port")
    return f"{TAG}\n{challenge}\n{address}".encode()


def signer(identity: Identity) -> Signer:
    """Sign probe messages with the identity's private key (ECDSA over SHA-256, DER)."""

    def sign(data: bytes) -> bytes:
        key = serialization.load_pem_private_key(identity.key_path.read_bytes(), password=None)
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return key.sign(data)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise IdentityError(f"{identity.key_path} is not an EC private key")
        return key.sign(data, ec.ECDSA(hashes.SHA256()))

    return sign


def answer(sock: socket.socket, payload: memoryview, sign: Signer) -> None:
    """Host side: answer the PROBE whose payload is ``payload``, then raise `Answered`.

    Raises:
        Answered: always, once the signature was sent (the caller closes the socket).
        ProtocolError: a malformed probe (nothing is signed).
        OSError: the answer could not be sent.
    """
    if payload.nbytes > MAX_PAYLOAD:
        raise ProtocolError(f"PROBE of {payload.nbytes} bytes exceeds {MAX_PAYLOAD} bytes")
    msg = wire.decode_json(payload, limit=MAX_PAYLOAD)
    challenge, address = msg.get("challenge"), msg.get("address")
    if set(msg) != {"challenge", "address"} or not isinstance(challenge, str) or not isinstance(address, str):
        raise ProtocolError('PROBE must be exactly {"challenge", "address"} strings')
    signature = sign(message(challenge, address))
    wire.write_frame(
        sock, Kind.PROBE_OK, [wire.encode_json({"signature": base64.b64encode(signature).decode()})]
    )
    raise Answered(f"answered an address probe for {address}")


def ask(sock: socket.socket, challenge: str, address: str) -> str:
    """Broker side: send a probe on a connected socket and return the signature (base64).

    The caller sets the socket's timeout and verifies the signature against the key
    registered for the account (see ``matchmaker.probes``).

    Raises:
        ProtocolError: the host answered with anything but one well-formed PROBE_OK.
        OSError: the connection failed or timed out.
    """
    message(challenge, address)  # checks both formats before anything is sent
    wire.write_frame(sock, Kind.PROBE, [wire.encode_json({"challenge": challenge, "address": address})])
    kind, payload = wire.read_frame(sock, max_frame=MAX_PAYLOAD)
    if kind is not Kind.PROBE_OK:
        raise ProtocolError(f"answered {kind.name} to PROBE")
    signature = wire.decode_json(payload, limit=MAX_PAYLOAD).get("signature")
    if not isinstance(signature, str) or not _SIGNATURE.fullmatch(signature):
        raise ProtocolError("PROBE_OK needs a base64 signature")
    return signature
