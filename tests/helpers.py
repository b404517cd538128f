"""Small helpers for API tests: keys, accounts, auth headers."""

from __future__ import annotations

import itertools
import platform
from typing import Any

import dill
from cryptography.hazmat.primitives.asymmetric import ed25519

from scripts.load import public_pem, sign, user_body
from tests import listeners

__all__ = [
    "KEYS",
    "RUNTIME",
    "auth",
    "challenge",
    "offer",
    "public_pem",
    "request_pool",
    "sign",
    "signup",
    "user_body",
]

#: The private key of each account made by `signup`, by account id.
KEYS: dict[str, ed25519.Ed25519PrivateKey] = {}

_counter = itertools.count()
RUNTIME = {"python": platform.python_version(), "dill": dill.__version__, "platform": "linux"}


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def challenge(client: Any) -> str:
    """A fresh challenge from the broker."""
    result = client.post("/v1/challenges")
    assert result.status_code == 201, result.text
    return result.json["challenge"]


def signup(
    client: Any,
    email: str | None = None,
    *,
    password: str = "correct horse battery",  # noqa: S107
    key: ed25519.Ed25519PrivateKey | None = None,
) -> dict[str, Any]:
    """Create an account with a signed challenge; returns its JSON (with ``token``).
    Its private key is kept in ``KEYS[id]``; its address is a real loopback listener
    that answers the broker's address probes with that key (an honest host)."""
    n = next(_counter)
    email = email or f"user{n}@example.org"
    key = key or ed25519.Ed25519PrivateKey.generate()
    host = listeners.responder(key.sign)
    body = user_body(challenge(client), email, password, host.address, key)
    result = client.post("/v1/users", json=body)
    assert result.status_code == 201, result.text
    KEYS[result.json["id"]] = key
    return result.json


def offer(client: Any, token: str, jobs: int, runtime: dict[str, str] | None = None) -> None:
    """Make an account's peer look for ``jobs`` jobs."""
    result = client.post(
        "/v1/users/me/jobs", json={"jobs": jobs, "runtime": runtime or RUNTIME}, headers=auth(token)
    )
    assert result.status_code == 200, result.text


def request_pool(client: Any, token: str, workers: int, **extra: Any) -> dict[str, Any]:
    body = {"workers": workers, "runtime": RUNTIME, **extra}
    result = client.post("/v1/sessions", json=body, headers=auth(token))
    assert result.status_code == 202, result.text
    return result.json
