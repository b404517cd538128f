"""Four matchmaker processes, fifty concurrent pool requests, thirty peers of two
slots: no slot given twice, every outcome as its numbers say, every slot returned."""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from broker_api.matching.registry import Registry
from broker_api.models import Member, Session, db
from scripts.stack import Process
from tests.helpers import auth, offer, signup

pytestmark = pytest.mark.slow

PEERS, SLOTS, REQUESTS, MATCHMAKERS = 30, 2, 50, 4


def test_many_matchmakers_never_give_a_slot_twice(client, conn, env, tmp_path):
    rng = random.Random(7)
    peers = [signup(client) for _ in range(PEERS)]
    for p in peers:
        offer(client, p["token"], SLOTS)
    requesters = [signup(client) for _ in range(10)]
    workers = [Process("matchmaker", env, tmp_path) for _ in range(MATCHMAKERS)]
    workers.append(Process("prober", env, tmp_path))
    try:
        time.sleep(1.0)  # let them start (requests arriving earlier simply queue)

        def request(n: int) -> tuple[str, int, int]:
            want = rng.randint(1, 4)
            minimum = rng.randint(1, want)
            r = client.post(
                "/v1/sessions",
                json={"workers": want, "minWorkers": minimum, "timeout": 3},
                headers=auth(requesters[n % len(requesters)]["token"]),
            )
            assert r.status_code == 202, r.text
            return r.json["id"], want, minimum

        with ThreadPoolExecutor(16) as pool:
            asked = list(pool.map(request, range(REQUESTS)))

        deadline = time.monotonic() + 60
        while True:
            with db.connection_context():
                pending = Session.select().where(Session.status == "pending").count()
            if pending == 0:
                break
            if time.monotonic() > deadline:
                logs = "\n".join(w.output()[-3000:] for w in workers)
                raise AssertionError(f"{pending} sessions still pending; matchmaker logs:\n{logs}")
            time.sleep(0.2)

        with db.connection_context():
            per_peer: dict[str, int] = {}
            for sid, want, minimum in asked:
                session = Session.get_by_id(sid)
                slots = sum(m.slots for m in Member.select().where(Member.session == sid))
                for m in Member.select().where(Member.session == sid):
                    per_peer[m.user_id] = per_peer.get(m.user_id, 0) + m.slots
                if session.status == "matched":
                    assert slots == want
                elif session.status == "partial":
                    assert minimum <= slots < want
                else:
                    assert session.status == "failed" and slots == 0, (session.status, slots)
        assert max(per_peer.values()) <= SLOTS, "a slot was given twice"
        assert sum(per_peer.values()) <= PEERS * SLOTS
        statuses = {Session.get_by_id(sid).status for sid, _, _ in asked}
        assert "matched" in statuses

        registry = Registry(conn, stale_after=30)
        for p in peers:
            info = registry.peer(p["id"])
            assert info.held == per_peer.get(p["id"], 0)

        for n, (sid, _, _) in enumerate(asked):
            r = client.delete(f"/v1/sessions/{sid}", headers=auth(requesters[n % len(requesters)]["token"]))
            assert r.status_code == 204
        for p in peers:
            info = registry.peer(p["id"])
            assert (info.held, info.free) == (0, SLOTS)
    finally:
        for w in workers:
            w.stop()
    for w in workers:
        assert "Traceback" not in w.output(), w.output()
