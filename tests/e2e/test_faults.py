"""Processes of the broker killed or restarted: nothing is lost, nothing given twice.

These run the real processes from the Procfile (gunicorn, ``python -m matchmaker``)
against the test's own Redis and database.
"""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ed25519

from broker_api.matching.registry import Registry
from broker_api.models import Member, Session, db
from scripts.stack import Process, free_port, wait_http
from tests import listeners
from tests.helpers import RUNTIME, auth, offer, signup, user_body


@pytest.mark.slow
def test_matchmaker_killed_while_matching(client, conn, env, tmp_path, run_probes):
    """SIGKILL the only matchmaker in the middle of a burst of requests: after a
    restart every pending session is matched exactly once and no slot is given twice."""
    peers = [signup(client) for _ in range(40)]
    for p in peers:
        offer(client, p["token"], 1)
    run_probes()  # the peers' addresses proven, as a prober does
    requester = signup(client)
    sessions = [
        client.post("/v1/sessions", json={"workers": 1, "timeout": 60, "runtime": RUNTIME},
                    headers=auth(requester["token"])).json["id"]
        for _ in range(40)
    ]  # fmt: skip
    first = Process("matchmaker", env, tmp_path)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with db.connection_context():
                done = Session.select().where(Session.status == "matched").count()
            if done >= 3:
                break
            time.sleep(0.005)
        first.kill(signal.SIGKILL)
        first.proc.wait(10)
    finally:
        first.stop()
    with db.connection_context():
        killed_at = Session.select().where(Session.status == "matched").count()
    assert killed_at < 40, "the matchmaker finished before it could be killed; make the burst larger"
    second = Process("matchmaker", env, tmp_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            with db.connection_context():
                pending = Session.select().where(Session.status == "pending").count()
            if not pending:
                break
            assert time.monotonic() < deadline, second.output()
            time.sleep(0.1)
    finally:
        second.stop()
    registry = Registry(conn, stale_after=30)
    with db.connection_context():
        assert {s.status for s in Session.select()} == {"matched"}
        for sid in sessions:
            assert Member.select().where(Member.session == sid).count() == 1
        for p in peers:
            held = sum(m.slots for m in Member.select().where(Member.user == p["id"]))
            assert held == 1 == registry.peer(p["id"]).held  # each slot given exactly once
    assert "Traceback" not in second.output()


def _web(env: dict[str, str], tmp_path, port: int) -> Process:
    web = Process("web", {**env, "PORT": str(port)}, tmp_path)
    wait_http(f"http://127.0.0.1:{port}/v1/health", proc=web)
    return web


@pytest.mark.slow
def test_api_restart_keeps_earlier_tokens_valid(env, tmp_path):
    port = free_port()
    web = _web(env, tmp_path, port)
    try:
        base = f"http://127.0.0.1:{port}"
        challenge = requests.post(f"{base}/v1/challenges", timeout=10).json()["challenge"]
        body = user_body(challenge, "restart@example.org", "restart password", "127.0.0.1:7000")
        user = requests.post(f"{base}/v1/users", json=body, timeout=10).json()
    finally:
        web.stop()
    web = _web(env, tmp_path, port)  # a new process: keys come from the key file
    try:
        me = requests.get(f"http://127.0.0.1:{port}/v1/users/me", headers=auth(user["token"]), timeout=10)
        assert me.status_code == 200 and me.json()["email"] == "restart@example.org"
    finally:
        web.stop()


def test_two_node_broker(env, tmp_path, conn):
    """Two gunicorn instances and two matchmakers on one database and one Redis (not
    marked slow, so CI's PostgreSQL run covers it on PostgreSQL): a token from one instance works on the
    other, and concurrent requests through both never get a slot twice."""
    keys = '{"enc": "' + "A" * 43 + '", "sig": "' + "B" * 43 + '"}'
    shared = {**env, "TOKEN_KEYS": keys}
    ports = [free_port(), free_port()]
    nodes = [_web(shared, tmp_path, port) for port in ports]
    matchmakers = [Process("matchmaker", shared, tmp_path) for _ in range(2)]
    matchmakers.append(Process("prober", shared, tmp_path))
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        http = requests.Session()

        def signup_at(url: str, n: int) -> dict:
            challenge = http.post(f"{url}/v1/challenges", timeout=10).json()["challenge"]
            key = ed25519.Ed25519PrivateKey.generate()
            host = listeners.responder(key.sign)  # an honest host: answers the broker's probe
            body = user_body(challenge, f"node{n}@example.org", "two nodes!", host.address, key)
            r = http.post(f"{url}/v1/users", json=body, timeout=10)
            assert r.status_code == 201, r.text
            return r.json()

        peers = [signup_at(urls[n % 2], n) for n in range(12)]
        for n, p in enumerate(peers):  # each peer's token is used on the *other* node
            r = http.post(f"{urls[(n + 1) % 2]}/v1/users/me/jobs", json={"jobs": 2, "runtime": RUNTIME},
                          headers=auth(p["token"]), timeout=10)  # fmt: skip
            assert r.status_code == 200, r.text
        requesters = [signup_at(urls[n % 2], 100 + n) for n in range(6)]

        def ask(n: int) -> str:
            body = {"workers": 2, "minWorkers": 1, "timeout": 3, "runtime": RUNTIME}
            headers = auth(requesters[n % 6]["token"])
            r = requests.post(f"{urls[n % 2]}/v1/sessions", json=body, headers=headers, timeout=10)
            assert r.status_code == 202, r.text
            return r.json()["id"]

        with ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(ask, range(30)))
        deadline = time.monotonic() + 60
        while True:
            with db.connection_context():
                if not Session.select().where(Session.status == "pending").count():
                    break
            assert time.monotonic() < deadline
            time.sleep(0.2)
        registry = Registry(conn, stale_after=30)
        with db.connection_context():
            for p in peers:
                held = sum(m.slots for m in Member.select().where(Member.user == p["id"]))
                assert held <= 2 and held == registry.peer(p["id"]).held
            assert Member.select().count() > 0
            statuses = {Session.get_by_id(i).status for i in ids}
        assert statuses <= {"matched", "partial", "failed"} and "matched" in statuses
    finally:
        for proc in [*matchmakers, *nodes]:
            proc.stop()
    for proc in matchmakers:
        assert "Traceback" not in proc.output()
