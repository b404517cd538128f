"""Hostile input at every endpoint: the SPEC's status, a JSON error naming the problem,
never a 500, and nothing written."""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
import pytest

from broker_api.models import Member, Session, User, db
from tests.helpers import auth, challenge, offer, public_pem, request_pool, signup, user_body

VALID: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/v1/users"): {
        "email": "new@example.org",
        "password": "long enough",
        "pubKey": "<pem>",
        "address": "h:1",
        "challenge": "<challenge>",
        "signature": "<signature>",
    },
    ("POST", "/v1/tokens"): {"email": "someone@example.org", "password": "whatever it is"},
    ("PATCH", "/v1/users/me"): {
        "address": "elsewhere.example.org:9",
        "currentPassword": "correct horse battery",
    },
    ("POST", "/v1/users/me/jobs"): {"jobs": 2},
    ("POST", "/v1/sessions"): {"workers": 2, "minWorkers": 1, "timeout": 5},
}
WRONG_TYPES: dict[tuple[str, str], list[dict[str, Any]]] = {
    ("POST", "/v1/users"): [{"email": 5}, {"password": ["x"]}, {"pubKey": {}}, {"address": 80},
                            {"email": "not-an-email"}, {"password": "short"}, {"pubKey": "not a key"},
                            {"address": "no-port"}, {"address": "host:99999"},
                            {"email": "nul\x00@example.org"}, {"address": "h\x00st:1"},
                            {"email": "a@example.org\n"}, {"address": "h:1\n"},
                            {"challenge": "x" * 43 + "\n"}, {"challenge": "short"},
                            {"signature": "not base64!"}, {"signature": "A" * 300}],
    ("POST", "/v1/tokens"): [{"email": None}, {"password": 12345678}, {"email": "a\x00@example.org"},
                             {"challenge": "short"}, {"signature": "not base64!"}],
    ("PATCH", "/v1/users/me"): [{"address": True}, {"pubKey": 1}, {"address": "a b:1"},
                                {"challenge": 5}, {"currentSignature": "%%%"}],
    ("POST", "/v1/users/me/jobs"): [{"jobs": "2"}, {"jobs": -1}, {"jobs": 1.5}, {"jobs": True},
                                    {"jobs": 10**6}, {"runtime": "3.11"}, {"runtime": {"python": 3}},
                                    {"runtime": {"python": "3.11\x00", "dill": "0.4", "platform": "x"}},
                                    {"runtime": {"python": "3.11.x", "dill": "0.4"}},
                                    {"runtime": {"python": "3.11", "dill": "0.4" + "1" * 40}},
                                    {"runtime": {"python": "3.11", "dill": "0.4", "platform": "a b"}}],
    ("POST", "/v1/sessions"): [{"workers": "2"}, {"workers": 0}, {"workers": 10**9}, {"timeout": -1},
                               {"minWorkers": 3}, {"runtime": []}, {"workers": None}],
}  # fmt: skip
REQUIRED = {
    ("POST", "/v1/users"): ["email", "password", "pubKey", "address", "challenge", "signature"],
    ("POST", "/v1/tokens"): ["email"],
    ("POST", "/v1/sessions"): ["workers"],
}
AUTHED = [
    ("GET", "/v1/users/me"),
    ("PATCH", "/v1/users/me"),
    ("DELETE", "/v1/users/me"),
    ("POST", "/v1/users/me/jobs"),
    ("POST", "/v1/users/me/heartbeat"),
    ("POST", "/v1/sessions"),
    ("GET", "/v1/sessions"),
    ("GET", "/v1/sessions/0123456789abcdef0123456789abcdef"),
    ("DELETE", "/v1/sessions/0123456789abcdef0123456789abcdef"),
    ("DELETE", "/v1/sessions/0123456789abcdef0123456789abcdef/workers/me"),
]


@pytest.fixture
def world(client, run_matchmaker):
    """Two accounts, one offering slots, one owning a matched session."""
    peer = signup(client, "peer@example.org")
    owner = signup(client, "owner@example.org")
    offer(client, peer["token"], 2)
    sid = request_pool(client, owner["token"], 1)["id"]
    run_matchmaker()
    return {"peer": peer, "owner": owner, "sid": sid, "client": client}


def snapshot(conn) -> Any:
    """Everything a request could write: rows, and the registry and queue in Redis."""
    with db.connection_context():
        users = sorted(
            (u.id, u.email, u.address, u.pub_key, u.jobs, u.runtime, u.password_hash, u.token_version)
            for u in User.select()
        )
        sessions = sorted((s.id, s.status, s.updated_at) for s in Session.select())
        members = sorted((m.session_id, m.user_id, m.slots) for m in Member.select())
    state = {}
    for key in conn.scan_iter("cb:*"):
        if key.startswith((b"cb:tokver:", b"cb:login-fail:", b"cb:challenge")):
            continue
        kind = conn.type(key)
        if kind == b"hash":
            state[key] = conn.hgetall(key)
        elif kind == b"zset":
            state[key] = conn.zrange(key, 0, -1, withscores=True)
        else:
            state[key] = conn.dump(key)
    queued = conn.llen("rq:queue:matchmaker")
    return users, sessions, members, state, queued


def _body(world, key):
    body = dict(VALID[key])
    if "challenge" in body:  # a valid sign-up: a fresh key proven over a fresh challenge
        signed = user_body(challenge(world["client"]), body["email"], body["password"], body["address"])
        body.update(signed)
    elif "pubKey" in body:
        body["pubKey"] = public_pem()
    return body


def _headers(world, key):
    return {} if key[1] in ("/v1/users", "/v1/tokens") else auth(world["owner"]["token"])


def _assert_error(r, status, *words):
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["Content-Type"].startswith("application/json")
    assert set(r.json) <= {"title", "description"} and r.json["title"]
    for word in words:
        assert word in r.json.get("description", ""), (word, r.json)
    assert "Traceback" not in r.text


BODY_ENDPOINTS = list(VALID)


@pytest.mark.parametrize("key", BODY_ENDPOINTS, ids=lambda k: f"{k[0]} {k[1]}")
def test_malformed_and_non_object_json(client, world, conn, key):
    before = snapshot(conn)
    for raw in (b'{"workers": ', b"{'a': 1}", b"[1, 2]", b'"text"', b"\xff\xfe", b'{"jobs": NaN}'):
        r = client.request(
            key[0], key[1], body=raw, content_type="application/json", headers=_headers(world, key)
        )
        _assert_error(r, 400)
    assert snapshot(conn) == before


@pytest.mark.parametrize("key", BODY_ENDPOINTS, ids=lambda k: f"{k[0]} {k[1]}")
def test_wrong_types_name_the_field(client, world, conn, key):
    before = snapshot(conn)
    for change in WRONG_TYPES[key]:
        body = {**_body(world, key), **change}
        r = client.request(key[0], key[1], json=body, headers=_headers(world, key))
        _assert_error(r, 400)
        field = next(iter(change))
        assert field in r.json["description"] or "workers" in r.json["description"], (change, r.json)
    assert snapshot(conn) == before


@pytest.mark.parametrize("key", list(REQUIRED), ids=lambda k: f"{k[0]} {k[1]}")
def test_missing_fields_are_named(client, world, conn, key):
    before = snapshot(conn)
    for field in REQUIRED[key]:
        body = _body(world, key)
        del body[field]
        r = client.request(key[0], key[1], json=body, headers=_headers(world, key))
        _assert_error(r, 400, field)
    r = client.request(key[0], key[1], json={}, headers=_headers(world, key))
    _assert_error(r, 400)
    r = client.request(key[0], key[1], headers=_headers(world, key))
    _assert_error(r, 400, "required")
    assert snapshot(conn) == before


@pytest.mark.parametrize("key", BODY_ENDPOINTS, ids=lambda k: f"{k[0]} {k[1]}")
def test_extra_fields_are_named(client, world, conn, key):
    before = snapshot(conn)
    body = {**_body(world, key), "isAdmin": True}
    r = client.request(key[0], key[1], json=body, headers=_headers(world, key))
    _assert_error(r, 400, "isAdmin")
    assert snapshot(conn) == before


@pytest.mark.parametrize("key", BODY_ENDPOINTS, ids=lambda k: f"{k[0]} {k[1]}")
def test_huge_bodies_are_413(client, world, conn, settings, key):
    before = snapshot(conn)
    huge = json.dumps({**_body(world, key), "padding": "x" * (settings.max_body_bytes + 10)})
    r = client.request(
        key[0], key[1], body=huge, content_type="application/json", headers=_headers(world, key)
    )
    _assert_error(r, 413, "limit")
    assert snapshot(conn) == before


@pytest.mark.parametrize("key", BODY_ENDPOINTS, ids=lambda k: f"{k[0]} {k[1]}")
def test_wrong_content_type_is_415(client, world, conn, key):
    before = snapshot(conn)
    for ctype in ("text/plain", "application/x-www-form-urlencoded", None):
        r = client.request(
            key[0],
            key[1],
            body=json.dumps(_body(world, key)),
            content_type=ctype,
            headers=_headers(world, key),
        )
        _assert_error(r, 415, "application/json")
    assert snapshot(conn) == before


def _bad_tokens(world, client, settings):
    """Every kind of bad credential, paired with what it is."""
    from broker_api.tokens import TokenCodec, TokenKeys

    good = world["owner"]["token"]
    flipped = good[:40] + ("A" if good[40] != "A" else "B") + good[41:]
    keys = TokenKeys.from_json(settings.token_key_file.read_text())
    expired = TokenCodec(keys, 60).issue(world["owner"]["id"], 1, now=time.time() - 3600)[0]
    bare = jwt.encode(
        {"sub": world["owner"]["id"], "ver": 1, "iat": int(time.time()), "exp": 2**31}, keys.sig
    )
    none = jwt.encode({"sub": world["owner"]["id"], "ver": 1, "iat": 1, "exp": 2**31}, None, algorithm="none")
    # A token issued before a password change, and one of a deleted account.
    revoked = signup(client, "revoked@example.org", password="old password")
    client.patch(
        "/v1/users/me",
        json={"password": "new password!", "currentPassword": "old password"},
        headers=auth(revoked["token"]),
    )
    deleted = signup(client, "deleted@example.org")
    client.delete("/v1/users/me", headers=auth(deleted["token"]))
    return {
        "missing": {},
        "basic scheme": {"Authorization": "Basic dXNlcjpwYXNz"},
        "empty bearer": {"Authorization": "Bearer "},
        "garbage": auth("not.a.token"),
        "alg none": auth(none),
        "JWS without JWE": auth(bare),
        "flipped byte": auth(flipped),
        "expired": auth(expired),
        "before password change": auth(revoked["token"]),
        "deleted account": auth(deleted["token"]),
        "huge": auth("A" * 10000),
    }


def test_bad_tokens_are_401_everywhere(client, world, conn, settings):
    bad = _bad_tokens(world, client, settings)
    before = snapshot(conn)
    for name, headers in bad.items():
        for method, path in AUTHED:
            kwargs: dict[str, Any] = {"headers": headers}
            if method in ("POST", "PATCH") and path != "/v1/users/me/heartbeat":
                kwargs["json"] = VALID.get((method, path), {})
            r = client.request(method, path, **kwargs)
            _assert_error(r, 401)
            assert r.headers.get("WWW-Authenticate", "").startswith("Bearer"), (name, method, path)
    assert snapshot(conn) == before


@pytest.mark.parametrize("sid", ["nope", "0" * 32, "../users/me", "%00", "x" * 2000, "ünïcode", "1 OR 1=1"])
def test_unknown_session_ids_are_404(client, world, conn, sid):
    before = snapshot(conn)
    token = world["owner"]["token"]
    for method, path in (
        ("GET", f"/v1/sessions/{sid}"),
        ("DELETE", f"/v1/sessions/{sid}"),
        ("DELETE", f"/v1/sessions/{sid}/workers/me"),
    ):
        r = client.request(method, path, headers=auth(token))
        _assert_error(r, 404)
    assert snapshot(conn) == before


def test_other_users_session_is_404_and_untouched(client, world, conn):
    stranger = signup(client, "stranger@example.org")
    before = snapshot(conn)
    sid = world["sid"]
    for method, path in (
        ("GET", f"/v1/sessions/{sid}"),
        ("GET", f"/v1/sessions/{sid}?wait=1"),
        ("DELETE", f"/v1/sessions/{sid}"),
        ("DELETE", f"/v1/sessions/{sid}/workers/me"),
    ):
        r = client.request(method, path, headers=auth(stranger["token"]))
        _assert_error(r, 404)
    assert snapshot(conn) == before


def test_unknown_routes_and_methods_are_json(client, world):
    r = client.get("/v1/nothing-here")
    _assert_error(r, 404)
    r = client.request("PUT", "/v1/users/me", headers=auth(world["owner"]["token"]))
    assert r.status_code == 405


def test_challenges_take_no_input(client, conn):
    """``POST /v1/challenges`` reads nothing from the caller: any body is ignored, other
    methods are 405, and every answer is a fresh 43-character nonce."""
    seen = set()
    for body in (None, b"{}", b"garbage \x00\xff", b"x" * 100_000):
        r = client.request("POST", "/v1/challenges", body=body, content_type="application/json")
        assert r.status_code == 201, r.text
        assert len(r.json["challenge"]) == 43 and r.json["challenge"] not in seen
        seen.add(r.json["challenge"])
    for method in ("GET", "PUT", "DELETE", "PATCH"):
        assert client.request(method, "/v1/challenges").status_code == 405
