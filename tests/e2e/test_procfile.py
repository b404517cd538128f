"""The real processes from the Procfile: gunicorn and rq matchmakers, over HTTP."""

from __future__ import annotations

import time

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ed25519

from scripts.stack import Process, free_port, wait_http
from tests import listeners
from tests.helpers import RUNTIME, user_body

pytestmark = pytest.mark.slow


@pytest.fixture
def stack(env, tmp_path):
    port = free_port()
    env = {**env, "PORT": str(port), "WEB_CONCURRENCY": "2", "WEB_THREADS": "8"}
    web = Process("web", env, tmp_path)
    matchmaker = Process("matchmaker", env, tmp_path)
    prober = Process("prober", env, tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/v1/health", proc=web)
        yield base
    finally:
        web.stop()
        matchmaker.stop()
        prober.stop()


def test_newcomer_walkthrough_over_http(stack):
    """The README's curl walkthrough: two accounts, 2 jobs, a pool of 2, matched."""
    http = requests.Session()
    key = ed25519.Ed25519PrivateKey.generate()
    host = listeners.responder(key.sign)  # the peer's machine, answering the broker's probe
    peer = http.post(
        f"{stack}/v1/users",
        json=user_body(
            http.post(f"{stack}/v1/challenges").json()["challenge"],
            "peer@example.org",
            "peer password",
            host.address,
            key,
        ),
    ).json()
    http.post(
        f"{stack}/v1/users",
        json=user_body(
            http.post(f"{stack}/v1/challenges").json()["challenge"],
            "req@example.org",
            "requester pw",
            "127.0.0.1:7002",
        ),
    )
    login = http.post(f"{stack}/v1/tokens", json={"email": "req@example.org", "password": "requester pw"})
    assert login.status_code == 201
    token = login.json()["token"]
    r = http.post(
        f"{stack}/v1/users/me/jobs",
        json={"jobs": 2, "runtime": RUNTIME},
        headers={"Authorization": f"Bearer {peer['token']}"},
    )
    assert r.json() == {"jobs": 2}
    t0 = time.perf_counter()
    created = http.post(
        f"{stack}/v1/sessions",
        json={"workers": 2, "runtime": RUNTIME},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert created.status_code == 202
    url = stack + created.headers["Location"]
    session = http.get(url, params={"wait": 10}, headers={"Authorization": f"Bearer {token}"}).json()
    if session["status"] == "pending":  # the long-poll returns on any change
        session = http.get(url, params={"wait": 10}, headers={"Authorization": f"Bearer {token}"}).json()
    elapsed = time.perf_counter() - t0
    assert session["status"] == "matched", session
    assert session["workers"] == [
        {"id": peer["id"], "address": host.address, "pubKey": peer["pubKey"], "slots": 2}
    ]
    assert elapsed < 5
    # Both gunicorn workers accept the same token (shared key file).
    for _ in range(8):
        assert (
            requests.get(
                f"{stack}/v1/users/me", headers={"Authorization": f"Bearer {token}"}, timeout=10
            ).status_code
            == 200
        )
