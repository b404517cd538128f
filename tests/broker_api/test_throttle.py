"""The password throttle counts before it checks, and covers every password check."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from falcon import testing

from broker_api.models import db
from tests.helpers import auth, signup


def _burst(app, n: int, send) -> list[int]:
    """``n`` requests at once from ``n`` threads (each its own TestClient and database
    connection, as gunicorn's threads have); their statuses."""
    barrier = threading.Barrier(n)

    def one(_: int) -> int:
        client = testing.TestClient(app)
        barrier.wait()
        try:
            return send(client).status_code
        finally:
            if not db.is_closed():
                db.close()

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_a_concurrent_burst_of_guesses_is_held_to_the_limit(client, app, settings):
    signup(client, "burst@example.org", password="the right one")
    body = {"email": "burst@example.org", "password": "a wrong guess"}
    statuses = _burst(app, 40, lambda c: c.simulate_post("/v1/tokens", json=body))
    checked = statuses.count(401)  # a 401 is a password that was hashed and compared
    assert checked <= settings.login_max_failures, statuses
    assert statuses.count(429) == 40 - checked
    right = client.post("/v1/tokens", json={"email": "burst@example.org", "password": "the right one"})
    assert right.status_code == 429


def test_current_password_guessing_is_throttled(client, settings):
    user = signup(client, "patch@example.org", password="the right one")
    headers = auth(user["token"])
    guess = {"address": "attacker.example.org:1", "currentPassword": "a wrong guess"}
    statuses = [client.patch("/v1/users/me", json=guess, headers=headers).status_code for _ in range(8)]
    assert statuses == [403] * settings.login_max_failures + [429] * (8 - settings.login_max_failures)
    right = {"address": "attacker.example.org:1", "currentPassword": "the right one"}
    r = client.patch("/v1/users/me", json=right, headers=headers)
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0
    assert client.get("/v1/users/me", headers=headers).json["address"] == user["address"]


def test_log_in_and_patch_share_one_budget(client, settings):
    user = signup(client, "shared@example.org", password="the right one")
    guess = {"address": "attacker.example.org:1", "currentPassword": "a wrong guess"}
    for _ in range(settings.login_max_failures):
        assert client.patch("/v1/users/me", json=guess, headers=auth(user["token"])).status_code == 403
    r = client.post("/v1/tokens", json={"email": "shared@example.org", "password": "the right one"})
    assert r.status_code == 429


def test_concurrent_current_password_guesses_are_held_to_the_limit(client, app, settings):
    user = signup(client, "patchburst@example.org", password="the right one")
    guess = {"address": "attacker.example.org:1", "currentPassword": "a wrong guess"}
    statuses = _burst(
        app, 40, lambda c: c.simulate_patch("/v1/users/me", json=guess, headers=auth(user["token"]))
    )
    assert statuses.count(403) <= settings.login_max_failures, statuses
    assert statuses.count(429) == 40 - statuses.count(403)


def test_successful_logins_from_one_address_are_not_counted_against_it(client, settings):
    """The per-address limit (10x) counts failures: many honest log-ins from one
    address (a NAT, a test stack) stay possible."""
    users = [signup(client, f"many{n}@example.org", password="the right one") for n in range(3)]
    for _ in range(20 * settings.login_max_failures):
        for user in users:
            r = client.post("/v1/tokens", json={"email": user["email"], "password": "the right one"})
            assert r.status_code == 201, r.text
