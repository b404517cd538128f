"""Small helpers for API tests: keys, accounts, auth headers."""

from __future__ import annotations

import itertools
import platform
from typing import Any

import dill

from scripts.load import public_pem

__all__ = ["RUNTIME", "auth", "offer", "public_pem", "request_pool", "signup"]

_counter = itertools.count()
RUNTIME = {"python": platform.python_version(), "dill": dill.__version__, "platform": "linux"}


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def signup(
    client: Any,
    email: str | None = None,
    *,
    password: str = "correct horse battery",  # noqa: S107
) -> dict[str, Any]:
    """Create an account; returns its JSON (with ``token``)."""
    n = next(_counter)
    email = email or f"user{n}@example.org"
    result = client.post(
        "/v1/users",
        json={
            "email": email,
            "password": password,
            "pubKey": public_pem(),
            "address": f"127.0.0.1:{20000 + n}",
        },
    )
    assert result.status_code == 201, result.text
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
