"""Access tokens: a signed JWT (pyjwt, HS256) nested in a JWE (``dir`` + ``A256GCM``).

Signing proves the broker issued the claims; encryption hides them (user id, token
version) from anyone holding the token. The JWE is RFC 7516 compact serialization, so a
standard JOSE library holding the key opens it. Verification needs no database query:
revocation compares the token's ``ver`` claim with the account's current version, which
the caller supplies (cached in Redis, see ``broker_api.auth``).

This is the only module that imports pyjwt and the AEAD.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import jwt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker_api.exceptions import InvalidToken
from broker_api.files import private_dir

#: The only protected header we emit and accept (algorithm pinning).
_HEADER = {"alg": "dir", "enc": "A256GCM", "cty": "JWT"}
_HEADER_B64 = base64.urlsafe_b64encode(json.dumps(_HEADER, separators=(",", ":")).encode()).rstrip(b"=")
_MAX_TOKEN = 4096


def _b64d(part: str) -> bytes:
    if "=" in part:
        raise InvalidToken("token is not base64url without padding")
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError):
        raise InvalidToken("token is not base64url") from None


def _b64e(raw: bytes) -> bytes:
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


@dataclass(frozen=True)
class TokenKeys:
    """The two 32-byte keys: one encrypts (AES-256-GCM), one signs (HS256)."""

    enc: bytes
    sig: bytes

    @classmethod
    def generate(cls) -> TokenKeys:
        return cls(enc=secrets.token_bytes(32), sig=secrets.token_bytes(32))

    @classmethod
    def from_json(cls, text: str) -> TokenKeys:
        """Parse ``{"enc": b64url, "sig": b64url}``; each key must be 32 bytes."""
        try:
            raw = json.loads(text)
            keys = cls(
                enc=base64.urlsafe_b64decode(raw["enc"] + "=" * (-len(raw["enc"]) % 4)),
                sig=base64.urlsafe_b64decode(raw["sig"] + "=" * (-len(raw["sig"]) % 4)),
            )
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise ValueError(f"token keys are not valid JSON keys: {exc}") from None
        if len(keys.enc) != 32 or len(keys.sig) != 32:
            raise ValueError("token keys must be 32 bytes each")
        return keys

    def to_json(self) -> str:
        return json.dumps({"enc": _b64e(self.enc).decode(), "sig": _b64e(self.sig).decode()})

    @classmethod
    def load_or_create(cls, path: Path) -> TokenKeys:
        """Read the key file, creating it atomically (mode 0600) if absent.

        Several gunicorn workers may start at once: each writes a private temporary file
        and hard-links it into place, which fails if another won; all then read the
        same file.
        """
        if not path.exists():
            private_dir(path.parent)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "w") as fh:
                    fh.write(cls.generate().to_json())
                    fh.flush()
                    os.fsync(fh.fileno())
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    pass
            finally:
                tmp.unlink(missing_ok=True)
        return cls.from_json(path.read_text())


@dataclass(frozen=True)
class Claims:
    """What a valid token says: whose it is, its version, and when it expires."""

    user_id: str
    version: int
    issued_at: int
    expires_at: int


class TokenCodec:
    """Issues and verifies nested JWS-in-JWE tokens with fixed algorithms."""

    def __init__(self, keys: TokenKeys, ttl: int) -> None:
        self._aead = AESGCM(keys.enc)
        self._sig = keys.sig
        self._ttl = ttl

    def issue(self, user_id: str, version: int, *, now: float | None = None) -> tuple[str, int]:
        """Return ``(token, expires_at)`` for the user at the given token version."""
        iat = int(time.time() if now is None else now)
        exp = iat + self._ttl
        inner = jwt.encode(
            {"sub": user_id, "ver": version, "iat": iat, "exp": exp},
            self._sig,
            algorithm="HS256",
        ).encode()
        iv = secrets.token_bytes(12)
        sealed = self._aead.encrypt(iv, inner, _HEADER_B64)
        ciphertext, tag = sealed[:-16], sealed[-16:]
        token = b".".join([_HEADER_B64, b"", _b64e(iv), _b64e(ciphertext), _b64e(tag)])
        return token.decode(), exp

    def verify(self, token: str) -> Claims:
        """Open and check a token; any defect raises ``InvalidToken``.

        The protected header must be exactly ours (no ``zip``, ``crit`` or other
        algorithm), the encrypted-key part empty, the tag valid, and the inner JWS an
        HS256 signature with ``sub``, ``ver``, ``iat`` and an unexpired ``exp``.
        """
        if len(token) > _MAX_TOKEN:
            raise InvalidToken("token is too long")
        parts = token.split(".")
        if len(parts) != 5:
            raise InvalidToken("token is not a JWE compact serialization")
        header_b64, enc_key, iv_b64, ct_b64, tag_b64 = parts
        try:
            header = json.loads(_b64d(header_b64))
        except ValueError:
            raise InvalidToken("token header is not JSON") from None
        if header != _HEADER:
            raise InvalidToken("token header must be exactly alg=dir, enc=A256GCM, cty=JWT")
        if enc_key:
            raise InvalidToken("token must not carry an encrypted key with alg=dir")
        iv, ciphertext, tag = _b64d(iv_b64), _b64d(ct_b64), _b64d(tag_b64)
        if len(iv) != 12 or len(tag) != 16:
            raise InvalidToken("token IV or tag has the wrong length")
        try:
            inner = self._aead.decrypt(iv, ciphertext + tag, header_b64.encode("ascii"))
        except (InvalidTag, UnicodeEncodeError):
            raise InvalidToken("token failed authentication") from None
        try:
            claims = jwt.decode(
                inner,
                self._sig,
                algorithms=["HS256"],
                options={"require": ["sub", "ver", "iat", "exp"]},
            )
        except jwt.ExpiredSignatureError:
            raise InvalidToken("token has expired") from None
        except jwt.InvalidTokenError as exc:
            raise InvalidToken(f"token claims are invalid: {exc}") from None
        sub, ver = claims["sub"], claims["ver"]
        if not isinstance(sub, str) or not isinstance(ver, int) or isinstance(ver, bool):
            raise InvalidToken("token claims have the wrong types")
        return Claims(sub, ver, int(claims["iat"]), int(claims["exp"]))
