"""Proof of a private key: single-use broker challenges and the signatures over them.

``POST /v1/challenges`` hands out a random nonce, kept in Redis for a short TTL and
consumed (``GETDEL``) by the first request that uses it, so a signature is never good
twice. What is signed binds the nonce to its purpose and subject, so a signature made
to log in cannot register an account or change a key::

    compute-broker/v1\\n<purpose>\\n<challenge>\\n<subject>

``purpose`` is one of `PURPOSES`; ``subject`` is the normalized email (``register``,
``login``) or the account id (``set-key``: the new key; ``update``: the registered
key proving a change). Ed25519 keys sign the bytes; EC keys (P-256, as
``peer.identity`` makes) sign them with ECDSA over SHA-256, DER-encoded. Signatures
travel as standard base64.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import time

import redis
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from broker_api.exceptions import InvalidRequest, TooManyRequests

PURPOSES = ("register", "login", "set-key", "update")
_PREFIX = "cb:challenge:"


def message(purpose: str, challenge: str, subject: str) -> bytes:
    """The bytes a key signs to use ``challenge`` for ``purpose`` on ``subject``."""
    return f"compute-broker/v1\n{purpose}\n{challenge}\n{subject}".encode()


def load_key(pem: str) -> ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey:
    """Parse a pubKey; only key types that can sign a challenge are accepted."""
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except (ValueError, TypeError, UnicodeEncodeError):
        raise InvalidRequest("field 'pubKey' must be a PEM-encoded public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
        raise InvalidRequest("field 'pubKey' must be an EC (P-256) or Ed25519 public key")
    return key


def normalize(pem: str) -> str:
    """The canonical SubjectPublicKeyInfo PEM of a key: one key, one spelling."""
    return (
        load_key(pem)
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def verify(pem: str, signature: str, data: bytes) -> bool:
    """True when ``signature`` (base64) is ``pem``'s signature over ``data``."""
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        return False
    key = load_key(pem)
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(raw, data)
        else:
            key.verify(raw, data, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return False
    return True


class Challenges:
    """Issue and consume challenges in Redis.

    Args:
        ttl: seconds a challenge stays usable.
        per_client: challenges one client address may get per ``ttl`` window.
    """

    def __init__(self, conn: redis.Redis, *, ttl: int, per_client: int) -> None:
        self._conn = conn
        self._ttl = ttl
        self._per_client = per_client
        self._count = conn.register_script(
            "local n = redis.call('INCR', KEYS[1])"
            " if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end"
            " return {n, redis.call('TTL', KEYS[1])}"
        )

    def issue(self, client: str) -> tuple[str, int]:
        """A fresh challenge and when it expires; 429 past the per-client bound."""
        count, ttl = self._count(keys=[f"cb:challenge-rate:{client}"], args=[self._ttl])
        if int(count) > self._per_client:
            raise TooManyRequests("too many challenges from this address; retry later", max(1, int(ttl)))
        nonce = secrets.token_urlsafe(32)
        expires = int(time.time()) + self._ttl
        self._conn.set(_PREFIX + nonce, "1", ex=self._ttl)
        return nonce, expires

    def consume(self, challenge: str) -> bool:
        """Use up ``challenge``: True once if it was issued and has not expired."""
        return self._conn.getdel(_PREFIX + challenge) is not None
