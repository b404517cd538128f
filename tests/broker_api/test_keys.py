"""Keys are proven, not claimed: challenges, signed sign-up, key log-in, key changes."""

from __future__ import annotations

import dataclasses
import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from falcon import testing

from broker_api.app import create_app
from broker_api.challenges import message
from tests.helpers import KEYS, auth, challenge, public_pem, sign, signup, user_body
from tests.openapi_check import ResponseChecker


def _ec_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def _ec_sign(key: ec.EllipticCurvePrivateKey, purpose: str, c: str, subject: str) -> str:
    import base64

    from cryptography.hazmat.primitives import hashes

    return base64.b64encode(key.sign(message(purpose, c, subject), ec.ECDSA(hashes.SHA256()))).decode()


def _login_by_key(client, email: str, key: ed25519.Ed25519PrivateKey, c: str | None = None):
    c = c or challenge(client)
    return client.post(
        "/v1/tokens", json={"email": email, "challenge": c, "signature": sign(key, "login", c, email)}
    )


def test_challenges_are_fresh_and_short_lived(client, settings):
    a, b = client.post("/v1/challenges"), client.post("/v1/challenges")
    assert a.status_code == b.status_code == 201
    assert a.json["challenge"] != b.json["challenge"]
    assert time.time() < a.json["expiresAt"] <= time.time() + settings.challenge_ttl + 1


def test_signup_with_a_p256_key_as_peers_make(client):
    key = ec.generate_private_key(ec.SECP256R1())
    c = challenge(client)
    body = {
        "email": "p256@example.org",
        "password": "long enough",
        "pubKey": _ec_pem(key),
        "address": "h:1",
        "challenge": c,
        "signature": _ec_sign(key, "register", c, "p256@example.org"),
    }
    r = client.post("/v1/users", json=body)
    assert r.status_code == 201, r.text
    c = challenge(client)
    login = {
        "email": "p256@example.org",
        "challenge": c,
        "signature": _ec_sign(key, "login", c, "p256@example.org"),
    }
    assert client.post("/v1/tokens", json=login).status_code == 201


def test_signup_without_a_signature_says_what_changed(client):
    body = user_body(challenge(client), "old@example.org", "long enough", "h:1")
    del body["challenge"], body["signature"]
    r = client.post("/v1/users", json=body)
    assert r.status_code == 400
    assert "'challenge' is required" in r.json["description"]
    assert "POST /v1/challenges" in r.json["description"]


def test_a_copied_public_key_cannot_be_registered(client):
    victim = signup(client, "victim@example.org")
    thief = ed25519.Ed25519PrivateKey.generate()
    c = challenge(client)
    body = {
        **user_body(c, "thief@example.org", "long enough", "h:1", thief),
        "pubKey": victim["pubKey"],  # claims the victim's key, signs with its own
    }
    r = client.post("/v1/users", json=body)
    assert r.status_code == 400
    assert "signature" in r.json["description"]


def test_a_key_registered_to_another_account_is_409(client):
    first = signup(client, "first@example.org")
    key = KEYS[first["id"]]
    r = client.post(
        "/v1/users", json=user_body(challenge(client), "second@example.org", "long enough", "h:1", key)
    )
    assert r.status_code == 409
    assert "pubKey" in r.json["description"]
    # Another spelling of the same key (CRLF line ends, blank lines) is the same key.
    c = challenge(client)
    body = user_body(c, "third@example.org", "long enough", "h:1", key)
    body["pubKey"] = "\r\n" + body["pubKey"].replace("\n", "\r\n") + "\r\n"
    r = client.post("/v1/users", json=body)
    assert r.status_code == 409


def test_changing_to_another_accounts_key_is_409(client):
    a, b = signup(client), signup(client)
    key = KEYS[a["id"]]  # suppose b's owner also holds a's key: still one key, one account
    c = challenge(client)
    r = client.patch(
        "/v1/users/me",
        json={
            "pubKey": a["pubKey"],
            "challenge": c,
            "signature": sign(key, "set-key", c, b["id"]),
            "currentSignature": sign(KEYS[b["id"]], "update", c, b["id"]),
        },
        headers=auth(b["token"]),
    )
    assert r.status_code == 409


@pytest.mark.parametrize(
    "defect", ["other challenge", "used", "expired", "wrong purpose", "wrong email", "unknown"]
)
def test_signups_over_a_bad_challenge_are_refused(client, conn, defect):
    key = ed25519.Ed25519PrivateKey.generate()
    email = "bad@example.org"
    c = challenge(client)
    body = user_body(c, email, "long enough", "h:1", key)
    if defect == "other challenge":
        body["challenge"] = challenge(client)
    elif defect == "used":
        first = user_body(c, "used@example.org", "long enough", "h:2")
        assert client.post("/v1/users", json=first).status_code == 201
    elif defect == "expired":
        conn.pexpire(f"cb:challenge:{c}", 1)
        time.sleep(0.05)
    elif defect == "wrong purpose":
        body["signature"] = sign(key, "login", c, email)
    elif defect == "wrong email":
        body["signature"] = sign(key, "register", c, "someone@example.org")
    elif defect == "unknown":
        body["challenge"] = "A" * 43
    r = client.post("/v1/users", json=body)
    assert r.status_code == 400, r.text
    field = "challenge" if defect in ("used", "expired", "unknown") else "signature"
    assert f"'{field}'" in r.json["description"]
    assert client.post("/v1/tokens", json={"email": email, "password": "long enough"}).status_code == 401


def test_key_login_and_its_failures(client):
    user = signup(client, "key@example.org")
    key = KEYS[user["id"]]
    r = _login_by_key(client, "key@example.org", key)
    assert r.status_code == 201
    assert client.get("/v1/users/me", headers=auth(r.json["token"])).json["id"] == user["id"]
    c = challenge(client)
    assert _login_by_key(client, "key@example.org", key, c).status_code == 201
    assert _login_by_key(client, "key@example.org", key, c).status_code == 401  # single use
    stranger = ed25519.Ed25519PrivateKey.generate()
    assert _login_by_key(client, "key@example.org", stranger).status_code == 401
    assert _login_by_key(client, "nobody@example.org", key).status_code == 401
    c = challenge(client)  # a sign-up signature does not log in
    body = {
        "email": "key@example.org",
        "challenge": c,
        "signature": sign(key, "register", c, "key@example.org"),
    }
    assert client.post("/v1/tokens", json=body).status_code == 401
    both = {**body, "password": "correct horse battery"}
    assert client.post("/v1/tokens", json=both).status_code == 400
    assert client.post("/v1/tokens", json={"email": "key@example.org"}).status_code == 400


def test_key_login_works_while_the_password_throttle_is_exhausted(client, settings):
    user = signup(client, "host@example.org")
    for _ in range(settings.login_max_failures + 3):
        client.post("/v1/tokens", json={"email": "host@example.org", "password": "a stranger's guess"})
    r = client.post("/v1/tokens", json={"email": "host@example.org", "password": "correct horse battery"})
    assert r.status_code == 429
    assert _login_by_key(client, "host@example.org", KEYS[user["id"]]).status_code == 201


@pytest.mark.parametrize(
    "change",
    [{"address": "attacker.example.org:7000"}, {"pubKey": "<new>"}, {"password": "a new password"}],
    ids=["address", "pubKey", "password"],
)
def test_a_token_alone_cannot_change_key_address_or_password(client, change):
    user = signup(client)
    before = client.get("/v1/users/me", headers=auth(user["token"])).json
    key = ed25519.Ed25519PrivateKey.generate()
    body = dict(change)
    if "pubKey" in body:
        c = challenge(client)
        body.update(pubKey=public_pem(key), challenge=c, signature=sign(key, "set-key", c, user["id"]))
    r = client.patch("/v1/users/me", json=body, headers=auth(user["token"]))
    assert r.status_code == 400, r.text
    assert "currentPassword" in r.json["description"] and "currentSignature" in r.json["description"]
    # A signature by any key but the registered one is no proof either.
    c = challenge(client)
    body.update(challenge=c, currentSignature=sign(key, "update", c, user["id"]))
    if "pubKey" in body:
        body["signature"] = sign(key, "set-key", c, user["id"])
    r = client.patch("/v1/users/me", json=body, headers=auth(user["token"]))
    assert r.status_code == 403, r.text
    assert "currentSignature" in r.json["description"]
    assert client.get("/v1/users/me", headers=auth(user["token"])).json == before
    # The registered key's signature is proof.
    c = challenge(client)
    body.update(challenge=c, currentSignature=sign(KEYS[user["id"]], "update", c, user["id"]))
    if "pubKey" in body:
        body["signature"] = sign(key, "set-key", c, user["id"])
    r = client.patch("/v1/users/me", json=body, headers=auth(user["token"]))
    assert r.status_code == 200, r.text


def test_a_new_key_must_sign_for_itself(client):
    user = signup(client)
    c = challenge(client)
    body = {"pubKey": public_pem(), "currentPassword": "correct horse battery"}
    r = client.patch("/v1/users/me", json=body, headers=auth(user["token"]))
    assert r.status_code == 400 and "'signature'" in r.json["description"]
    other = ed25519.Ed25519PrivateKey.generate()
    body.update(challenge=c, signature=sign(other, "set-key", c, user["id"]))
    r = client.patch("/v1/users/me", json=body, headers=auth(user["token"]))
    assert r.status_code == 400 and "'signature'" in r.json["description"]


def test_unchanged_fields_need_no_proof(client):
    user = signup(client)
    r = client.patch(
        "/v1/users/me",
        json={"address": user["address"], "pubKey": user["pubKey"]},
        headers=auth(user["token"]),
    )
    assert r.status_code == 200


def test_challenges_are_bounded_per_client(settings, conn):
    small = dataclasses.replace(settings, challenges_per_client=3)
    client = ResponseChecker(testing.TestClient(create_app(small, conn=conn)))
    assert [client.post("/v1/challenges").status_code for _ in range(4)] == [201, 201, 201, 429]
    r = client.post("/v1/challenges")
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0
    assert len(list(conn.scan_iter("cb:challenge:*"))) == 3
