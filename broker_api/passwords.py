"""Password hashing with scrypt, a memory-hard KDF, and a per-user random salt.

The stored form is ``scrypt$n$r$p$salt_b64$hash_b64`` so parameters can be raised later
while old hashes still verify. Comparison is constant-time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

_R, _P, _LEN = 8, 1, 32


def hash_password(password: str, *, n: int = 2**14) -> str:
    """Return the storable scrypt hash of ``password`` with a fresh 16-byte salt."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=_R, p=_P, dklen=_LEN)
    b64 = base64.b64encode
    return f"scrypt${n}${_R}${_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    """True when ``password`` matches ``stored``; malformed stored values never match."""
    try:
        scheme, n, r, p, salt_b64, digest_b64 = stored.split("$")
        if scheme != "scrypt":
            return False
        salt, expected = base64.b64decode(salt_b64), base64.b64decode(digest_b64)
        actual = hashlib.scrypt(
            password.encode(),
            salt=salt,
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(expected),
            maxmem=256 * 1024 * 1024,
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


#: A hash to verify against when the email is unknown, so that a login for a missing
#: account costs as much as one with a wrong password (no user enumeration by timing).
DUMMY_HASH = hash_password(secrets.token_hex(16))
