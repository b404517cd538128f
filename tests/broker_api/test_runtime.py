"""Runtime values have a strict format and the registry's buckets stay bounded."""

from __future__ import annotations

import random

from broker_api import schemas
from broker_api.bodies import _validator
from broker_api.matching.registry import Registry
from tests.helpers import RUNTIME, auth, offer, request_pool, signup


def _variants(n: int, seed: int = 8) -> list[dict[str, str]]:
    """``n`` distinct runtimes, as a hostile client would vary them: most of them
    well-formed, the rest long, odd or injected."""
    rng = random.Random(seed)
    junk = ["", "x" * 500, "3.11; rm", "3.1.1.1.1", "../../", "3.11\n", "\u0663.\u0661\u0661", "99.99"]
    out, seen = [], set()
    while len(out) < n:
        if rng.random() < 0.7:
            rt = {
                "python": f"3.{rng.randrange(100)}.{rng.randrange(100)}",
                "dill": f"{rng.randrange(10)}.{rng.randrange(100)}.{rng.randrange(100)}",
                "platform": rng.choice(["linux", "darwin", "win32"]) + f"-m{rng.randrange(10**6)}",
            }
        else:
            rt = {
                "python": rng.choice(junk) + str(rng.randrange(10**6)),
                "dill": rng.choice(junk),
                "platform": rng.choice(junk) + str(rng.random()),
            }
        key = tuple(sorted(rt.items()))
        if key not in seen:
            seen.add(key)
            out.append(rt)
    return out


def test_runtime_formats_are_strict():
    validator = _validator(schemas.RUNTIME)
    good = [
        RUNTIME,
        {"python": "3.12", "dill": "0.3.8"},
        {"python": "3.13.0rc1", "dill": "0.4", "platform": "linux-x86_64"},
    ]
    bad = [
        {"python": "3.11", "dill": "0.3", "platform": "linux x86"},
        {"python": "2.7", "dill": "0.3"},
        {"python": "3.11.0.0", "dill": "0.3"},
        {"python": "3.11", "dill": "0.3.8.1"},
        {"python": "3." + "1" * 40, "dill": "0.3"},
        {"python": "3.11", "dill": "0.3", "platform": "p" * 40},
        {"python": "3.\u0661\u0661", "dill": "0.3"},
        {"python": "3.11\n", "dill": "0.3"},
    ]
    assert all(validator.is_valid(rt) for rt in good)
    assert not any(validator.is_valid(rt) for rt in bad)


def test_20000_runtime_variants_are_refused_or_bounded(client, conn, settings):
    variants = _variants(20_000)
    validator = _validator(schemas.RUNTIME)
    accepted = [rt for rt in variants if validator.is_valid(rt)]
    assert len(accepted) < len(variants)  # the odd ones are refused by format
    accounts = [signup(client) for _ in range(3)]
    # Every refused variant through the API is a 400; a sample of the accepted ones
    # is sent too (all of them would only repeat the same path).
    for n, rt in enumerate([rt for rt in variants if not validator.is_valid(rt)][:500]):
        r = client.post(
            "/v1/users/me/jobs", json={"jobs": 1, "runtime": rt}, headers=auth(accounts[n % 3]["token"])
        )
        assert r.status_code == 400, (rt, r.text)
    registry = Registry(conn, stale_after=settings.stale_after)
    for n, rt in enumerate(accepted[:1500]):
        r = client.post(
            "/v1/users/me/jobs", json={"jobs": 1, "runtime": rt}, headers=auth(accounts[n % 3]["token"])
        )
        assert r.status_code == 200, (rt, r.text)
        assert len(registry.buckets()) <= 3  # one per announced peer at most
    # Sessions' runtimes are checked the same way, and a bucket emptied is forgotten.
    r = client.post(
        "/v1/sessions",
        json={"workers": 1, "runtime": variants[-1] | {"python": "x"}},
        headers=auth(accounts[0]["token"]),
    )
    assert r.status_code == 400
    for account in accounts:
        offer(client, account["token"], 1)
    assert len(registry.buckets()) == 1
    assert client.delete("/v1/users/me", headers=auth(accounts[0]["token"])).status_code == 204
    assert len(registry.buckets()) == 1
    request_pool(client, accounts[1]["token"], 1)


def test_withdrawn_peers_leave_no_bucket_behind(client, conn, settings):
    registry = Registry(conn, stale_after=settings.stale_after)
    user = signup(client)
    offer(client, user["token"], 1, {"python": "3.99", "dill": "9.99"})
    assert registry.buckets() == ["py3.99-dill9.99"]
    assert client.delete("/v1/users/me", headers=auth(user["token"])).status_code == 204
    assert registry.buckets() == []
