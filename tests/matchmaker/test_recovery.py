"""Losing Redis loses nothing: accounts, sessions and held slots survive a restart."""

from __future__ import annotations

from broker_api.matching.registry import Registry
from broker_api.models import Member, db
from tests.helpers import auth, offer, request_pool, signup


def test_redis_restarted_empty(client, run_matchmaker, redis_server, conn):
    peer, a, b = signup(client), signup(client), signup(client)
    offer(client, peer["token"], 2)
    matched = request_pool(client, a["token"], 1)["id"]
    run_matchmaker()
    waiting = request_pool(client, b["token"], 3, timeout=120)["id"]
    run_matchmaker()

    redis_server.restart_empty()
    assert conn.dbsize() == 0

    # Accounts and sessions are intact; earlier tokens still work.
    assert client.get("/v1/users/me", headers=auth(a["token"])).status_code == 200
    s = client.get(f"/v1/sessions/{matched}", headers=auth(a["token"])).json
    assert s["status"] == "matched" and s["slots"] == 1
    assert client.get(f"/v1/sessions/{waiting}", headers=auth(b["token"])).json["status"] == "pending"

    # The peer reappears with its next heartbeat; the slot it gives `matched` stays held.
    assert client.post("/v1/users/me/heartbeat", headers=auth(peer["token"])).status_code == 204
    registry = Registry(conn, stale_after=30)
    info = registry.peer(peer["id"])
    assert (info.total, info.held) == (2, 1)

    # The pending request was queued again and is matched once capacity suffices.
    run_matchmaker()
    assert client.get(f"/v1/sessions/{waiting}", headers=auth(b["token"])).json["status"] == "pending"
    more = signup(client)
    offer(client, more["token"], 2)
    run_matchmaker()
    s = client.get(f"/v1/sessions/{waiting}", headers=auth(b["token"])).json
    assert s["status"] == "matched" and s["slots"] == 3
    with db.connection_context():
        held = sum(m.slots for m in Member.select().where(Member.user == peer["id"]))
    assert held == 2 == registry.peer(peer["id"]).held

    # Ending both sessions gives every slot back.
    client.delete(f"/v1/sessions/{matched}", headers=auth(a["token"]))
    client.delete(f"/v1/sessions/{waiting}", headers=auth(b["token"]))
    assert registry.peer(peer["id"]).free == 2 and registry.peer(more["id"]).free == 2
