"""Chunked request bodies (no Content-Length) are read right, bounded, or refused
with 411: never taken as empty."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator

import pytest
import requests
from falcon import testing

from scripts.load import user_body
from scripts.stack import LocalStack


def _chunked(stack: LocalStack, method: str, path: str, body: bytes, token: str, chunk: int = 3):
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=30)
    try:
        conn.putrequest(method, path)
        conn.putheader("Authorization", f"Bearer {token}")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        for i in range(0, len(body), chunk):
            part = body[i : i + chunk]
            conn.send(f"{len(part):x}\r\n".encode() + part + b"\r\n")
        conn.send(b"0\r\n\r\n")
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"null")
    finally:
        conn.close()


@pytest.fixture(scope="module")
def stack() -> Iterator[LocalStack]:
    with LocalStack(env={"SCRYPT_N": "1024", "MAX_BODY_BYTES": "4096"}) as running:
        yield running


@pytest.fixture(scope="module")
def token(stack: LocalStack) -> str:
    challenge = requests.post(f"{stack.url}/v1/challenges", timeout=10).json()["challenge"]
    body = user_body(challenge, "chunked@example.org", "long enough", "127.0.0.1:9")
    r = requests.post(f"{stack.url}/v1/users", json=body, timeout=10)
    assert r.status_code == 201, r.text
    return r.json()["token"]


def test_chunked_bodies_are_read_under_gunicorn(stack, token):
    status, body = _chunked(stack, "POST", "/v1/users/me/jobs", b'{"jobs": 2}', token)
    assert (status, body) == (200, {"jobs": 2})
    status, body = _chunked(stack, "POST", "/v1/users/me/jobs", b'{"jobs": 0}', token)
    assert (status, body) == (200, {"jobs": 0})  # not read as empty (which means 1)
    me = requests.get(f"{stack.url}/v1/users/me", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert me.json()["jobs"] == 0


def test_chunked_bodies_are_bounded_and_validated(stack, token):
    huge = json.dumps({"jobs": 1, "pad": "x" * 10_000}).encode()
    status, body = _chunked(stack, "POST", "/v1/users/me/jobs", huge, token, chunk=1000)
    assert status == 413 and "limit" in body["description"]
    status, body = _chunked(stack, "POST", "/v1/users/me/jobs", b'{"jobs": ', token)
    assert status == 400
    status, body = _chunked(stack, "POST", "/v1/sessions", b'{"workers": 0}', token)
    assert status == 400 and "workers" in body["description"]


def test_a_server_that_cannot_end_a_chunked_body_answers_411(app):
    env = testing.create_environ(
        "/v1/tokens",
        method="POST",
        headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
        body=b'{"email": "a@example.org", "password": "whatever it is"}',
    )
    env.pop("CONTENT_LENGTH", None)
    env.pop("wsgi.input_terminated", None)
    start = testing.StartResponseMock()
    out = b"".join(app(env, start))
    assert start.status.startswith("411"), (start.status, out)
    assert "Content-Length" in json.loads(out)["description"]
