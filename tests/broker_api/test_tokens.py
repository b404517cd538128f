"""The token codec: interoperable JWE, pinned algorithms, every defect rejected."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jwcrypto import jwe, jwk

from broker_api.exceptions import InvalidToken
from broker_api.tokens import TokenCodec, TokenKeys

KEYS = TokenKeys.generate()
CODEC = TokenCodec(KEYS, ttl=60)


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_round_trip():
    token, exp = CODEC.issue("user-1", 7)
    claims = CODEC.verify(token)
    assert (claims.user_id, claims.version, claims.expires_at) == ("user-1", 7, exp)


def test_a_standard_jose_library_opens_our_token_and_we_open_its():
    token, _ = CODEC.issue("user-2", 3)
    key = jwk.JWK(kty="oct", k=b64(KEYS.enc))
    opened = jwe.JWE()
    opened.deserialize(token, key=key)
    assert opened.jose_header["cty"] == "JWT"
    inner = jwt.decode(opened.payload, KEYS.sig, algorithms=["HS256"])
    assert inner["sub"] == "user-2" and inner["ver"] == 3

    signed = jwt.encode(
        {"sub": "user-3", "ver": 1, "iat": int(time.time()), "exp": int(time.time()) + 60}, KEYS.sig
    )
    theirs = jwe.JWE(signed.encode(), json.dumps({"alg": "dir", "enc": "A256GCM", "cty": "JWT"}))
    theirs.add_recipient(key)
    claims = CODEC.verify(theirs.serialize(compact=True))
    assert claims.user_id == "user-3"


def test_alg_none_is_rejected():
    unsigned = jwt.encode({"sub": "u", "ver": 1, "iat": 1, "exp": 2**31}, None, algorithm="none")
    with pytest.raises(InvalidToken):
        CODEC.verify(unsigned)
    # alg=none inside a correctly encrypted envelope is rejected too.
    key = jwk.JWK(kty="oct", k=b64(KEYS.enc))
    env = jwe.JWE(unsigned.encode(), json.dumps({"alg": "dir", "enc": "A256GCM", "cty": "JWT"}))
    env.add_recipient(key)
    with pytest.raises(InvalidToken):
        CODEC.verify(env.serialize(compact=True))


def test_jws_without_jwe_layer_is_rejected():
    bare = jwt.encode({"sub": "u", "ver": 1, "iat": 1, "exp": 2**31}, KEYS.sig, algorithm="HS256")
    with pytest.raises(InvalidToken):
        CODEC.verify(bare)


@pytest.mark.parametrize(
    "header",
    [
        {"alg": "dir", "enc": "A128GCM", "cty": "JWT"},
        {"alg": "A256KW", "enc": "A256GCM", "cty": "JWT"},
        {"alg": "dir", "enc": "A256GCM", "cty": "JWT", "zip": "DEF"},
        {"alg": "dir", "enc": "A256GCM", "cty": "JWT", "crit": ["exp"]},
        {"alg": "none", "enc": "A256GCM", "cty": "JWT"},
    ],
)
def test_unexpected_headers_are_rejected(header):
    token, _ = CODEC.issue("u", 1)
    parts = token.split(".")
    parts[0] = b64(json.dumps(header).encode())
    with pytest.raises(InvalidToken):
        CODEC.verify(".".join(parts))


def test_other_key_and_wrong_signing_key_are_rejected():
    token, _ = TokenCodec(TokenKeys.generate(), 60).issue("u", 1)
    with pytest.raises(InvalidToken):
        CODEC.verify(token)
    mixed = TokenCodec(TokenKeys(enc=KEYS.enc, sig=os.urandom(32)), 60).issue("u", 1)[0]
    with pytest.raises(InvalidToken, match="claims"):
        CODEC.verify(mixed)


def test_expired_token_is_rejected():
    token, _ = CODEC.issue("u", 1, now=time.time() - 120)
    with pytest.raises(InvalidToken, match="expired"):
        CODEC.verify(token)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_mutation_of_a_token_is_rejected(data):
    token, _ = CODEC.issue("user-9", 2)
    kind = data.draw(st.sampled_from(["flip", "truncate", "insert"]))
    pos = data.draw(st.integers(0, len(token) - 1))
    if kind == "flip":
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.="
        ch = data.draw(st.sampled_from(alphabet).filter(lambda c: c != token[pos]))
        mutated = token[:pos] + ch + token[pos + 1 :]
    elif kind == "truncate":
        mutated = token[:pos]
    else:
        mutated = token[:pos] + data.draw(st.text(min_size=1, max_size=3)) + token[pos:]
    try:
        CODEC.verify(mutated)
    except InvalidToken:
        return
    # Only a change in a part's unused trailing base64 bits decodes to the same bytes:
    # then it is the same token, and nothing else may verify.
    assert _decoded(mutated) == _decoded(token)


def _decoded(token: str) -> list[bytes]:
    return [base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)) for p in token.split(".")]


def test_key_file_is_created_once_with_mode_0600(tmp_path: Path):
    path = tmp_path / "keys" / "token-keys.json"
    first = TokenKeys.load_or_create(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert TokenKeys.load_or_create(path) == first
    assert list(path.parent.iterdir()) == [path]
