"""Fair use: per-account caps (429 + Retry-After), bounded long-polls, fair slot sharing,
and a paginated session list (SPEC, "No account can starve the others")."""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

from falcon import testing

from broker_api.app import create_app
from matchmaker import jobs
from matchmaker.settings import Settings as MatchmakerSettings
from tests.helpers import auth, offer, request_pool, signup
from tests.openapi_check import ResponseChecker


def _client(settings: Any, conn: Any, **overrides: Any) -> ResponseChecker:
    """A checked TestClient over an app with some settings changed."""
    changed = dataclasses.replace(settings, **overrides)
    jobs.configure(
        dataclasses.replace(
            MatchmakerSettings.from_env(
                {"DATABASE_URL": changed.database_url, "REDIS_URL": changed.redis_url}
            ),
            max_held_slots=changed.max_held_slots,
            probe_private=changed.probe_private,
        )
    )
    return ResponseChecker(testing.TestClient(create_app(changed, conn=conn)))


def _status(client: Any, token: str, sid: str) -> str:
    return client.get(f"/v1/sessions/{sid}", headers=auth(token)).json["status"]


def test_pending_requests_of_one_account_are_capped(client, settings):
    greedy = signup(client)
    other = signup(client)
    cap = settings.max_pending_sessions
    codes: dict[int, int] = {}
    refused = None
    for _ in range(3000):
        r = client.post("/v1/sessions", json={"workers": 256, "timeout": 3600}, headers=auth(greedy["token"]))
        codes[r.status_code] = codes.get(r.status_code, 0) + 1
        if r.status_code == 429:
            refused = r
    assert codes == {202: cap, 429: 3000 - cap}
    assert refused is not None and int(refused.headers["Retry-After"]) >= 1
    # Another account is not affected.
    assert request_pool(client, other["token"], 1)["status"] == "pending"


def test_concurrent_pending_burst_does_not_slip_past_the_cap(settings, conn):
    client = _client(settings, conn, max_pending_sessions=5)
    greedy = signup(client)
    codes: list[int] = []

    def post() -> None:
        r = client.post("/v1/sessions", json={"workers": 1, "timeout": 3600}, headers=auth(greedy["token"]))
        codes.append(r.status_code)

    threads = [threading.Thread(target=post) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes.count(202) == 5 and codes.count(429) == 15


def test_long_polls_per_account_are_capped(settings, conn):
    client = _client(settings, conn, max_long_polls=30, long_poll_slots=200)
    waiter = signup(client)
    sid = request_pool(client, waiter["token"], 1, timeout=3600)["id"]
    results: list[int] = []

    def poll() -> None:
        r = client.get(f"/v1/sessions/{sid}", params={"wait": "5"}, headers=auth(waiter["token"]))
        results.append(r.status_code)

    threads = [threading.Thread(target=poll) for _ in range(30)]
    for t in threads:
        t.start()
    key = f"cb:polls:{waiter['id']}"
    deadline = time.monotonic() + 10
    while int(conn.get(key) or 0) < 30 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert int(conn.get(key) or 0) == 30
    r = client.get(f"/v1/sessions/{sid}", params={"wait": "5"}, headers=auth(waiter["token"]))
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    # A read without wait is not a long-poll and still answers.
    assert client.get(f"/v1/sessions/{sid}", headers=auth(waiter["token"])).status_code == 200
    # Deleting the session releases every waiter at once.
    client.delete(f"/v1/sessions/{sid}", headers=auth(waiter["token"]))
    for t in threads:
        t.join(10)
    assert results.count(404) == 30, results  # the session is gone: every waiter is told at once
    assert int(conn.get(key) or 0) == 0


def test_long_polls_beyond_the_process_share_answer_at_once(settings, conn):
    client = _client(settings, conn, long_poll_slots=2)
    waiter = signup(client)
    sid = request_pool(client, waiter["token"], 1, timeout=3600)["id"]
    threads = [
        threading.Thread(
            target=client.get,
            args=(f"/v1/sessions/{sid}",),
            kwargs={"params": {"wait": "3"}, "headers": auth(waiter["token"])},
        )
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while int(conn.get(f"cb:polls:{waiter['id']}") or 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    r = client.get(f"/v1/sessions/{sid}", params={"wait": "3"}, headers=auth(waiter["token"]))
    assert r.status_code == 200 and r.json["status"] == "pending"
    assert time.monotonic() - started < 1.0
    for t in threads:
        t.join(10)


def test_slots_held_per_account_are_capped(settings, conn, run_matchmaker):
    client = _client(settings, conn, max_held_slots=4)
    peers = [signup(client) for _ in range(3)]
    for p in peers:
        offer(client, p["token"], 4)
    greedy = signup(client)
    other = signup(client)
    big = request_pool(client, greedy["token"], 256, minWorkers=1)["id"]
    run_matchmaker()
    s = client.get(f"/v1/sessions/{big}", headers=auth(greedy["token"])).json
    assert s["status"] == "partial" and s["slots"] == 4
    # The cap is per account: a second request waits, another account is served.
    second = request_pool(client, greedy["token"], 1, timeout=3600)["id"]
    theirs = request_pool(client, other["token"], 4)["id"]
    run_matchmaker()
    assert _status(client, greedy["token"], second) == "pending"
    assert _status(client, other["token"], theirs) == "matched"
    # Freeing the big session's slots lets the waiting one through.
    client.delete(f"/v1/sessions/{big}", headers=auth(greedy["token"]))
    run_matchmaker()
    assert _status(client, greedy["token"], second) == "matched"


def test_freed_slots_are_shared_round_robin_across_accounts(client, run_matchmaker):
    a = signup(client)
    b = signup(client)
    a_sids = [request_pool(client, a["token"], 2, timeout=3600)["id"] for _ in range(3)]
    b_sid = request_pool(client, b["token"], 2, timeout=3600)["id"]
    run_matchmaker()
    assert all(_status(client, a["token"], s) == "pending" for s in a_sids)
    peer = signup(client)
    offer(client, peer["token"], 4)  # room for two of the four requests
    run_matchmaker()
    assert _status(client, b["token"], b_sid) == "matched"
    assert [_status(client, a["token"], s) for s in a_sids] == ["matched", "pending", "pending"]


def test_session_list_is_paginated_with_a_capped_page(client, settings):
    owner = signup(client)
    sids = [request_pool(client, owner["token"], 1, timeout=3600)["id"] for _ in range(7)]
    seen: list[str] = []
    params: dict[str, str] = {"limit": "3"}
    pages = 0
    while True:
        r = client.get("/v1/sessions", params=params, headers=auth(owner["token"]))
        assert r.status_code == 200 and len(r.json["sessions"]) <= 3
        seen += [s["id"] for s in r.json["sessions"]]
        pages += 1
        if "next" not in r.json:
            break
        params["cursor"] = r.json["next"]
    assert pages == 3 and sorted(seen) == sorted(sids) and len(seen) == len(set(seen))
    # Newest first.
    assert seen[0] == sids[-1]
    too_big = str(settings.max_page_size + 1)
    assert (
        client.get("/v1/sessions", params={"limit": too_big}, headers=auth(owner["token"])).status_code == 400
    )
    for bad in ("x", "1:zz", "1e9:" + "a" * 32):
        r = client.get("/v1/sessions", params={"cursor": bad}, headers=auth(owner["token"]))
        assert r.status_code == 400
    assert len(client.get("/v1/sessions", headers=auth(owner["token"])).json["sessions"]) == 7
    only = client.get("/v1/sessions", params={"status": "matched"}, headers=auth(owner["token"])).json
    assert only["sessions"] == []
    assert (
        client.get("/v1/sessions", params={"status": "nope"}, headers=auth(owner["token"])).status_code == 400
    )


def test_default_page_size_is_bounded(client, settings):
    owner = signup(client)
    for _ in range(settings.page_size + 1):
        request_pool(client, owner["token"], 1, timeout=3600)
    r = client.get("/v1/sessions", headers=auth(owner["token"]))
    assert len(r.json["sessions"]) == settings.page_size and "next" in r.json
