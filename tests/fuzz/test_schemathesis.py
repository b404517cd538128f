"""Schemathesis fuzzing of every operation in ``/openapi.json``, in process.

The hand-written tests in ``tests/broker_api`` check the inputs we thought of; this
file lets schemathesis generate the ones we did not: valid bodies and parameters
(positive mode) and ones that break the schema (negative mode), for every operation,
half of them sent with a real account's bearer token so that the handlers behind the
auth layer are reached too. Every response must be documented (status code, content
type, body schema) and nothing may answer 5xx, 503 included: Redis and the database
are up, so "unavailable" would be a bug.

The run is bounded (``FUZZ_MAX_EXAMPLES`` per operation and mode, default 30) and
derandomized so that a failure reproduces on the next run; the number of cases sent is
printed at the end of the module.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import hypothesis
import pytest
import redis
import schemathesis
from cryptography.hazmat.primitives.asymmetric import ed25519
from falcon import testing
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from broker_api.app import create_app
from broker_api.openapi import build_document
from broker_api.settings import Settings
from tests.helpers import KEYS, auth, offer, public_pem, request_pool, sign, signup

MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "60"))
_PATHS = build_document()["paths"]
OPERATIONS = [(method.upper(), path) for path, methods in _PATHS.items() for method in methods]
MODES = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
OWNER_PASSWORD = "owner password 1"

#: (method, path, mode) -> number of requests sent, and status -> count, for the report.
CASES: collections.Counter[tuple[str, str, str]] = collections.Counter()
STATUSES: collections.Counter[int] = collections.Counter()
VALID_TOKEN: collections.Counter[bool] = collections.Counter()

#: Known bugs, as (method, path, mode) -> reason; each such test is xfail(strict=True).
KNOWN_BUGS: dict[tuple[str, str, str], str] = {}


@dataclasses.dataclass
class World:
    """Real state for the fuzzer to reach past 401/404: an owner with a matched
    session, the peer working in it, and bad credentials of several kinds."""

    client: testing.TestClient
    owner: dict[str, Any]
    peer: dict[str, Any]
    session_id: str
    bad_tokens: dict[str, str]

    @property
    def owner_key(self) -> ed25519.Ed25519PrivateKey:
        return KEYS[self.owner["id"]]

    def challenge(self) -> str:
        """A fresh challenge, for cases that sign one."""
        return self.client.simulate_post("/v1/challenges").json["challenge"]

    def fresh_token(self) -> str:
        """A new account's token: for cases that may delete or revoke the account."""
        return signup(self.client)["token"]


@pytest.fixture
def fuzz_app(settings: Settings, conn: redis.Redis) -> Any:
    """The app with long-polls capped at 1 s: a generated ``?wait=1e300&since=matched``
    on a real session would otherwise hold the run for the default 30 s."""
    return create_app(dataclasses.replace(settings, max_wait=1), conn=conn)


@pytest.fixture
def world(fuzz_app: Any, run_matchmaker: Any) -> World:
    client = testing.TestClient(fuzz_app)
    owner = signup(client, "owner@example.org", password=OWNER_PASSWORD)
    peer = signup(client, "peer@example.org")
    offer(client, peer["token"], 2)
    session_id = request_pool(client, owner["token"], 1)["id"]
    run_matchmaker()
    deleted = signup(client)
    assert client.simulate_delete("/v1/users/me", headers=auth(deleted["token"])).status_code == 204
    good = owner["token"]
    return World(
        client=client,
        owner=owner,
        peer=peer,
        session_id=session_id,
        bad_tokens={
            "flipped": good[:40] + ("A" if good[40] != "A" else "B") + good[41:],
            "truncated": good[: len(good) // 2],
            "deleted account": deleted["token"],
            "five parts of junk": "a.b.c.d.e",
        },
    )


@pytest.fixture(scope="module", autouse=True)
def _report(request: pytest.FixtureRequest) -> Iterator[None]:
    """Print how many cases were sent, so the README can quote a real number."""
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or not CASES:
        return
    ops = len({(m, p) for m, p, _ in CASES})
    statuses = ", ".join(f"{code}: {n}" for code, n in sorted(STATUSES.items()))
    with capture.global_and_fixture_disabled():
        total = sum(CASES.values())
        reporter.write_line(
            f"\nschemathesis: {total} fuzz cases over {ops} operations, {VALID_TOKEN[True]} with a "
            f"valid token; statuses {statuses}"
        )


def _schema(app: Any) -> Any:
    # An explicit default config: a stray schemathesis.toml must not change the run.
    return schemathesis.openapi.from_wsgi("/openapi.json", app, config=schemathesis.Config())


def _params() -> list[Any]:
    params = []
    for method, path in OPERATIONS:
        op = _PATHS[path][method.lower()]
        # Negative mode needs something to break: a parameter, a body or a credential.
        breakable = any(k in op for k in ("parameters", "requestBody", "security"))
        for mode in MODES if breakable else MODES[:1]:
            key = (method, path, mode.value)
            marks = [pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[key])] if key in KNOWN_BUGS else []
            params.append(pytest.param(method, path, mode, id=f"{method} {path} {mode.value}", marks=marks))
    return params


def _personalize(case: Any, world: World, identity: str, real: bool) -> None:
    """Swap generated credentials and ids for real ones, as drawn for this case.

    ``identity`` is ``generated`` (keep what schemathesis made: a missing, malformed
    or random bearer), one of ``world.bad_tokens``, or ``owner``/``peer`` for a valid
    token (a fresh account's for ``DELETE /v1/users/me``). ``real`` swaps a generated
    session id, login or public key for a real one, so that positive cases get past
    404/401/400 into the handlers.
    """
    operation = (case.method.upper(), case.operation.path)
    if identity in ("owner", "peer"):
        token = world.owner["token"] if identity == "owner" else world.peer["token"]
        if operation == ("DELETE", "/v1/users/me"):
            token = world.fresh_token()  # deleting the shared accounts would end the run
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {token}"}
    elif identity != "generated":
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {world.bad_tokens[identity]}"}
    if not real:
        return
    if case.path_parameters and "sessionId" in case.path_parameters:
        case.path_parameters = {**case.path_parameters, "sessionId": world.session_id}
    if isinstance(case.body, dict):
        if "pubKey" in case.body:
            case.body = {**case.body, "pubKey": public_pem()}
        if operation == ("POST", "/v1/tokens"):
            case.body = {**case.body, "email": world.owner["email"], "password": OWNER_PASSWORD}
            if "challenge" in case.body:  # a key log-in instead, signed right
                del case.body["password"]
                c = world.challenge()
                case.body.update(
                    challenge=c, signature=sign(world.owner_key, "login", c, world.owner["email"])
                )
        if operation == ("POST", "/v1/users") and isinstance(case.body.get("email"), str):
            key = ed25519.Ed25519PrivateKey.generate()
            c = world.challenge()
            email = case.body["email"].strip().lower()
            case.body.update(pubKey=public_pem(key), challenge=c, signature=sign(key, "register", c, email))
        if operation == ("PATCH", "/v1/users/me") and identity in ("owner", "peer"):
            account = world.owner if identity == "owner" else world.peer
            c = world.challenge()
            key = KEYS[account["id"]]
            case.body = {
                **case.body,
                "challenge": c,
                "currentSignature": sign(key, "update", c, account["id"]),
            }
            case.body.pop("currentPassword", None)
            if "pubKey" in case.body:  # the same key again: the account keeps working
                case.body.update(pubKey=account["pubKey"], signature=sign(key, "set-key", c, account["id"]))


@pytest.mark.parametrize(("method", "path", "mode"), _params())
def test_operation_conforms_and_never_fails(
    world: World, fuzz_app: Any, method: str, path: str, mode: GenerationMode
) -> None:
    operation = _schema(fuzz_app)[path][method]
    identities = st.one_of(
        st.sampled_from(["owner", "peer"]),  # half of the cases carry a valid token
        st.sampled_from(["generated", *world.bad_tokens]),
    )

    @hypothesis.settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(case=operation.as_strategy(generation_mode=mode), identity=identities, real=st.booleans())
    def run(case: Any, identity: str, real: bool) -> None:
        _personalize(case, world, identity, real)
        response = case.call_and_validate(checks=CHECKS)
        CASES[(method, path, mode.value)] += 1
        STATUSES[response.status_code] += 1
        VALID_TOKEN[identity in ("owner", "peer") and "security" in _PATHS[path][method.lower()]] += 1
        assert response.status_code < 500, (response.status_code, response.text)

    run()
