"""Accounts: sign-up, log-in, own account, revocation, throttling."""

from __future__ import annotations

import time

from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.helpers import KEYS, auth, challenge, public_pem, sign, signup, user_body


def test_signup_returns_account_and_working_token(client):
    user = signup(client, "Alice@Example.org")
    assert user["email"] == "alice@example.org"
    assert user["jobs"] == 0
    me = client.get("/v1/users/me", headers=auth(user["token"]))
    assert me.status_code == 200
    assert me.json["id"] == user["id"]
    assert me.json["pubKey"] == user["pubKey"]


def test_email_taken_is_409_case_insensitively(client):
    signup(client, "bob@example.org")
    r = client.post("/v1/users", json=user_body(challenge(client), "BOB@example.org", "x" * 10, "h:1"))
    assert r.status_code == 409
    assert "already exists" in r.json["description"]


def test_login_gives_fresh_token(client):
    user = signup(client, "carol@example.org", password="a long password")
    r = client.post("/v1/tokens", json={"email": "carol@example.org", "password": "a long password"})
    assert r.status_code == 201
    assert r.json["expiresAt"] > time.time()
    assert client.get("/v1/users/me", headers=auth(r.json["token"])).json["id"] == user["id"]


def test_wrong_password_and_unknown_email_look_the_same(client):
    signup(client, "dave@example.org")
    wrong = client.post("/v1/tokens", json={"email": "dave@example.org", "password": "nope nope"})
    unknown = client.post("/v1/tokens", json={"email": "nobody@example.org", "password": "nope nope"})
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json == unknown.json
    assert wrong.headers["WWW-Authenticate"].startswith("Bearer")


def test_failed_logins_are_throttled_with_429(client, settings):
    signup(client, "eve@example.org", password="the right one")
    for _ in range(settings.login_max_failures):
        assert (
            client.post("/v1/tokens", json={"email": "eve@example.org", "password": "guess123"}).status_code
            == 401
        )
    r = client.post("/v1/tokens", json={"email": "eve@example.org", "password": "the right one"})
    assert r.status_code == 429
    assert int(r.headers["Retry-After"]) > 0
    # Another account is not locked out by eve's failures.
    signup(client, "frank@example.org", password="frank's pass")
    ok = client.post("/v1/tokens", json={"email": "frank@example.org", "password": "frank's pass"})
    assert ok.status_code == 201


def test_password_is_stored_with_scrypt_and_salt(client):
    from broker_api.models import User

    signup(client, "g1@example.org", password="same password")
    signup(client, "g2@example.org", password="same password")
    h1 = User.get(User.email == "g1@example.org").password_hash
    h2 = User.get(User.email == "g2@example.org").password_hash
    assert h1.startswith("scrypt$") and h2.startswith("scrypt$")
    assert h1 != h2
    assert "same password" not in h1


def test_patch_updates_address_and_key(client):
    user = signup(client)
    key = ed25519.Ed25519PrivateKey.generate()
    new_key = public_pem(key)
    c = challenge(client)
    r = client.patch(
        "/v1/users/me",
        json={
            "address": "peer.example.org:7000",
            "pubKey": new_key,
            "challenge": c,
            "signature": sign(key, "set-key", c, user["id"]),
            "currentSignature": sign(KEYS[user["id"]], "update", c, user["id"]),
        },
        headers=auth(user["token"]),
    )
    assert r.status_code == 200, r.text
    assert r.json["address"] == "peer.example.org:7000"
    assert r.json["pubKey"] == new_key
    assert "token" not in r.json


def test_password_change_revokes_older_tokens(client):
    user = signup(client, "h@example.org", password="first password")
    old = user["token"]
    r = client.patch(
        "/v1/users/me",
        json={"password": "second password", "currentPassword": "first password"},
        headers=auth(old),
    )
    assert r.status_code == 200
    new = r.json["token"]
    assert client.get("/v1/users/me", headers=auth(old)).status_code == 401
    assert client.get("/v1/users/me", headers=auth(new)).status_code == 200
    assert (
        client.post("/v1/tokens", json={"email": "h@example.org", "password": "first password"}).status_code
        == 401
    )
    assert (
        client.post("/v1/tokens", json={"email": "h@example.org", "password": "second password"}).status_code
        == 201
    )


def test_password_change_needs_current_password(client):
    user = signup(client, password="first password")
    missing = client.patch("/v1/users/me", json={"password": "second password"}, headers=auth(user["token"]))
    assert missing.status_code == 400
    assert "currentPassword" in missing.json["description"]
    wrong = client.patch(
        "/v1/users/me",
        json={"password": "second password", "currentPassword": "not it at all"},
        headers=auth(user["token"]),
    )
    assert wrong.status_code == 403
    assert client.get("/v1/users/me", headers=auth(user["token"])).status_code == 200


def test_delete_account_revokes_tokens_and_frees_email(client):
    user = signup(client, "i@example.org")
    assert client.delete("/v1/users/me", headers=auth(user["token"])).status_code == 204
    assert client.get("/v1/users/me", headers=auth(user["token"])).status_code == 401
    again = signup(client, "i@example.org")
    assert again["id"] != user["id"]
    assert client.get("/v1/users/me", headers=auth(user["token"])).status_code == 401


def test_token_still_valid_after_app_restart(client, settings, conn):
    """A second app (another gunicorn worker, or a restart) accepts earlier tokens."""
    from falcon import testing

    from broker_api.app import create_app

    user = signup(client)
    other = testing.TestClient(create_app(settings, conn=conn))
    assert other.simulate_get("/v1/users/me", headers=auth(user["token"])).status_code == 200


def test_health_and_openapi(client):
    r = client.get("/v1/health")
    assert r.status_code == 200
    assert r.json == {"status": "ok", "database": "ok", "redis": "ok"}
    doc = client.get("/openapi.json").json
    assert doc["openapi"].startswith("3.")
    assert "/v1/sessions/{sessionId}" in doc["paths"]
