"""The end-to-end demo: start the stack, walk through the API, shut everything down.

Two accounts are created; one offers two job slots as a peer, the other asks for a pool
of two workers and reads back the matched session with the peer's address and key.
"""

from __future__ import annotations

import platform
import sys
import time

import dill
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from scripts.stack import LocalStack

RUNTIME = {"python": platform.python_version(), "dill": dill.__version__, "platform": sys.platform}


def _pem() -> str:
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def walkthrough(url: str) -> dict:
    """What the README's curl walkthrough does, in Python."""
    http = requests.Session()

    def call(method: str, path: str, token: str | None = None, **kw) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        r = http.request(method, url + path, headers=headers, timeout=40, **kw)
        if r.status_code >= 400:
            raise SystemExit(f"{method} {path} -> {r.status_code} {r.text}")
        return r

    peer = call(
        "POST",
        "/v1/users",
        json={
            "email": "peer@example.org",
            "password": "peer password",
            "pubKey": _pem(),
            "address": "127.0.0.1:7001",
        },
    ).json()
    call("POST", "/v1/users", json={"email": "me@example.org", "password": "my password",
                                   "pubKey": _pem(), "address": "127.0.0.1:7002"})  # fmt: skip
    token = call("POST", "/v1/tokens", json={"email": "me@example.org", "password": "my password"}).json()[
        "token"
    ]
    print(f"created peer {peer['id']} and requester; logged in")
    call("POST", "/v1/users/me/jobs", peer["token"], json={"jobs": 2, "runtime": RUNTIME})
    print("peer is looking for 2 jobs")
    t0 = time.perf_counter()
    created = call("POST", "/v1/sessions", token, json={"workers": 2, "runtime": RUNTIME})
    session = created.json()
    while session["status"] == "pending":
        session = call("GET", created.headers["Location"], token, params={"wait": 10}).json()
    print(f"pool of 2 requested; {session['status']} in {1000 * (time.perf_counter() - t0):.1f} ms:")
    for w in session["workers"]:
        key = w["pubKey"].splitlines()[1][:24]
        print(f"  worker {w['id']} at {w['address']} with {w['slots']} slot(s), key {key}...")
    call("DELETE", created.headers["Location"], token)
    print("session ended; slots returned")
    return session


def main() -> int:
    with LocalStack() as stack:
        print(f"stack up: API {stack.url}, data in {stack.data_dir}")
        session = walkthrough(stack.url)
    ok = session["status"] == "matched" and sum(w["slots"] for w in session["workers"]) == 2
    print("demo OK: stack stopped" if ok else "demo FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
