"""An address is offered only once it is proven: the broker's probe job against real
listeners (honest hosts answering with their key, victims that only count
connections), a real Redis and the real API."""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
import time
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from falcon import testing

from broker_api.app import create_app
from matchmaker import jobs
from matchmaker.probes import ProbeRefused, check_ip, resolve
from matchmaker.settings import Settings as MatchmakerSettings
from tests import listeners
from tests.helpers import KEYS, auth, challenge, offer, request_pool, sign, signup
from tests.openapi_check import ResponseChecker


def _client(settings: Any, env: dict[str, str], conn: Any, **overrides: Any) -> ResponseChecker:
    """A checked client whose API and probe jobs use changed settings."""
    changed = dataclasses.replace(settings, **overrides)
    probe_overrides = {k: v for k, v in overrides.items() if k.startswith("probe")}
    jobs.configure(dataclasses.replace(MatchmakerSettings.from_env(env), **probe_overrides))
    return ResponseChecker(testing.TestClient(create_app(changed, conn=conn)))


def _move(client: Any, user: dict[str, Any], address: str) -> None:
    """Announce ``address`` for the account (proven with its key, as the API asks)."""
    c = challenge(client)
    body = {
        "address": address,
        "challenge": c,
        "currentSignature": sign(KEYS[user["id"]], "update", c, user["id"]),
    }
    r = client.patch("/v1/users/me", json=body, headers=auth(user["token"]))
    assert r.status_code == 200, r.text


def _proof(client: Any, user: dict[str, Any]) -> dict[str, Any]:
    return client.get("/v1/users/me", headers=auth(user["token"])).json["addressProof"]


def _session(client: Any, token: str, sid: str) -> dict[str, Any]:
    return client.get(f"/v1/sessions/{sid}", headers=auth(token)).json


def test_an_honest_host_is_probed_once_proven_and_matched(client, run_matchmaker):
    peer = signup(client)
    host = listeners._OPEN[-1]  # signup's responder, answering with the account's key
    assert _proof(client, peer)["state"] == "unproven"  # no slots offered: nothing to prove
    offer(client, peer["token"], 2)
    assert _proof(client, peer)["state"] == "probing"
    requester = signup(client)
    sid = request_pool(client, requester["token"], 1)["id"]
    run_matchmaker()
    assert _proof(client, peer)["state"] == "proven"
    session = _session(client, requester["token"], sid)
    assert session["status"] == "matched"
    assert [w["address"] for w in session["workers"]] == [host.address]
    for _ in range(5):  # heartbeats at the same address do not probe again
        assert client.post("/v1/users/me/heartbeat", headers=auth(peer["token"])).status_code == 204
    run_matchmaker()
    assert host.hits == 1


def test_an_address_the_account_does_not_control_never_reaches_a_requester(client, run_matchmaker):
    """The reflector attack: announce a victim's host:port with many slots. The victim
    gets one probe per change of address, however often the attacker heartbeats, and no
    requester is ever given its address."""
    victim = listeners.victim()
    attacker = signup(client)
    _move(client, attacker, victim.address)
    offer(client, attacker["token"], 1024)
    requester = signup(client)
    sid = request_pool(client, requester["token"], 4, minWorkers=1, timeout=1)["id"]
    for _ in range(10):
        assert client.post("/v1/users/me/heartbeat", headers=auth(attacker["token"])).status_code == 204
        run_matchmaker()
    proof = _proof(client, attacker)
    assert proof["state"] == "failed" and victim.address.split(":")[1] in proof["detail"]
    assert victim.hits == 1
    session = _session(client, requester["token"], sid)
    assert session["status"] == "pending" and session["workers"] == []
    time.sleep(2.1)  # the deadline job is scheduled at the next whole second after it
    run_matchmaker(with_scheduler=True)
    session = _session(client, requester["token"], sid)
    assert session["status"] == "failed" and session["workers"] == []
    # Changing the address proves again from scratch (and expires any earlier proof).
    other = listeners.victim()
    _move(client, attacker, other.address)
    run_matchmaker()
    assert (victim.hits, other.hits) == (1, 1)


def test_another_accounts_host_does_not_prove_the_attackers_address(client, run_matchmaker):
    """The host at the address answers, but with its own account's key: not proven."""
    honest, attacker = signup(client), signup(client)
    honest_host = listeners._OPEN[-2]
    offer(client, honest["token"], 1)
    _move(client, attacker, honest_host.address)
    offer(client, attacker["token"], 64)
    run_matchmaker()
    assert _proof(client, honest)["state"] == "proven"
    proof = _proof(client, attacker)
    assert proof["state"] == "failed" and "registered key" in proof["detail"]
    requester = signup(client)
    sid = request_pool(client, requester["token"], 1)["id"]
    run_matchmaker()
    session = _session(client, requester["token"], sid)
    assert [w["id"] for w in session["workers"]] == [honest["id"]]


def test_a_host_that_moves_after_its_match_is_not_shown_at_the_new_address(client, run_matchmaker):
    """Proven, matched, then the account announces a victim's address: the requester's
    view of the session leaves that worker out, the old proof expires, and moving back
    is probed again before the worker is shown again."""
    peer = signup(client)
    home = listeners._OPEN[-1]
    offer(client, peer["token"], 1)
    requester = signup(client)
    sid = request_pool(client, requester["token"], 1)["id"]
    run_matchmaker()
    assert [w["address"] for w in _session(client, requester["token"], sid)["workers"]] == [home.address]
    victim = listeners.victim()
    _move(client, peer, victim.address)
    run_matchmaker()
    session = _session(client, requester["token"], sid)
    assert session["status"] == "matched" and session["workers"] == [] and session["slots"] == 0
    listed = client.get("/v1/sessions", headers=auth(requester["token"])).json["sessions"]
    assert [s["workers"] for s in listed if s["id"] == sid] == [[]]
    assert victim.hits == 1
    _move(client, peer, home.address)
    assert _proof(client, peer)["state"] == "probing"  # the earlier proof expired with the move
    run_matchmaker()
    assert home.hits == 2
    assert [w["address"] for w in _session(client, requester["token"], sid)["workers"]] == [home.address]


def test_a_failed_host_is_probed_again_when_it_sets_its_jobs_not_on_heartbeats(client, run_matchmaker):
    """A host whose daemon was not listening when probed is proven once it announces
    its slots again (as ``serve`` does when it starts); heartbeats never retry."""
    peer = signup(client)
    listeners._OPEN.pop().close()  # the host's machine is not answering yet
    port = int(peer["address"].rsplit(":", 1)[1])
    offer(client, peer["token"], 1)
    run_matchmaker()
    assert _proof(client, peer)["state"] == "failed"
    host = listeners.responder(KEYS[peer["id"]].sign, port=port)  # now it is
    for _ in range(3):
        client.post("/v1/users/me/heartbeat", headers=auth(peer["token"]))
        run_matchmaker()
    assert host.hits == 0 and _proof(client, peer)["state"] == "failed"
    offer(client, peer["token"], 1)
    run_matchmaker()
    assert host.hits == 1 and _proof(client, peer)["state"] == "proven"


def test_a_host_signing_with_a_different_key_is_not_proven(client, run_matchmaker):
    peer = signup(client)
    impostor = listeners.responder(ed25519.Ed25519PrivateKey.generate().sign)
    _move(client, peer, impostor.address)
    offer(client, peer["token"], 1)
    run_matchmaker()
    assert impostor.hits == 1
    assert _proof(client, peer)["state"] == "failed"


def test_private_addresses_are_not_probed_unless_the_operator_allows_it(settings, env, conn, run_matchmaker):
    client = _client(settings, env, conn, probe_private=False)
    victim = listeners.victim()
    peer = signup(client)
    _move(client, peer, victim.address)
    offer(client, peer["token"], 1)
    run_matchmaker()
    proof = _proof(client, peer)
    assert proof["state"] == "failed" and "PROBE_PRIVATE_ADDRESSES" in proof["detail"]
    assert victim.hits == 0


def test_probes_per_account_are_limited(settings, env, conn, run_matchmaker):
    client = _client(settings, env, conn, probes_per_account=2, probe_window=60)
    victims = [listeners.victim() for _ in range(3)]
    attacker = signup(client)
    offer(client, attacker["token"], 1)
    run_matchmaker()  # the account's own address: the first probe
    for victim in victims:
        _move(client, attacker, victim.address)
        run_matchmaker()
    assert [v.hits for v in victims] == [1, 0, 0]
    proof = _proof(client, attacker)
    assert proof["state"] == "limited" and "rate limit" in proof["detail"]
    # Heartbeats do not retry a limited probe before its window ends.
    client.post("/v1/users/me/heartbeat", headers=auth(attacker["token"]))
    run_matchmaker()
    assert victims[2].hits == 0


def test_probes_per_target_are_limited_across_accounts(settings, env, conn, run_matchmaker):
    client = _client(settings, env, conn, probes_per_target=1, probe_window=60)
    victim = listeners.victim()
    attackers = [signup(client) for _ in range(4)]
    for attacker in attackers:
        _move(client, attacker, victim.address)
        offer(client, attacker["token"], 8)
        offer(client, attacker["token"], 8)  # an explicit retry, also held by the limit
        run_matchmaker()
    assert victim.hits == 1
    states = sorted(_proof(client, a)["state"] for a in attackers)
    assert states == ["failed", "limited", "limited", "limited"]


def test_probes_per_ip_hold_across_ports_and_accounts(settings, env, conn, run_matchmaker):
    """Many accounts announcing many ports of one machine cannot make the broker scan it."""
    client = _client(settings, env, conn, probes_per_ip=3, probe_window=60)
    victims = [listeners.victim() for _ in range(5)]  # five ports of 127.0.0.1
    for victim in victims:
        attacker = signup(client)
        _move(client, attacker, victim.address)
        offer(client, attacker["token"], 4)
        run_matchmaker()
    assert sum(v.hits for v in victims) == 3


def test_a_silent_host_costs_the_prober_one_short_timeout(settings, env, conn, run_matchmaker):
    client = _client(settings, env, conn, probe_timeout=0.5)
    silent = listeners.victim()  # takes the connection, never answers
    peer = signup(client)
    _move(client, peer, silent.address)
    offer(client, peer["token"], 1)
    t0 = time.monotonic()
    run_matchmaker()
    assert time.monotonic() - t0 < 3
    assert _proof(client, peer)["state"] == "failed"


@pytest.mark.parametrize(
    "ip",
    ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
     "240.0.0.1", "::1", "fe80::1", "fc00::1", "::ffff:127.0.0.1", "2002:7f00:1::1", "::"],
)  # fmt: skip
def test_non_public_ips_are_refused_by_default(ip):
    with pytest.raises(ProbeRefused):
        check_ip(ipaddress.ip_address(ip), private_ok=False)


def test_public_ips_pass_and_the_operator_can_allow_private_ones():
    check_ip(ipaddress.ip_address("8.8.8.8"), private_ok=False)
    check_ip(ipaddress.ip_address("2001:4860:4860::8888"), private_ok=False)
    check_ip(ipaddress.ip_address("127.0.0.1"), private_ok=True)
    with pytest.raises(ProbeRefused):
        check_ip(ipaddress.ip_address("224.0.0.1"), private_ok=True)  # never multicast


def test_names_are_resolved_once_and_the_checked_ip_is_what_gets_dialled():
    family, target = resolve("localhost:8080", private_ok=True)
    assert family in (socket.AF_INET, socket.AF_INET6)
    assert ipaddress.ip_address(target[0]).is_loopback and target[1] == 8080
    with pytest.raises(ProbeRefused, match="PROBE_PRIVATE_ADDRESSES"):
        resolve("localhost:8080", private_ok=False)
    with pytest.raises(ProbeRefused):
        resolve("no-such-host.invalid:1", private_ok=True)


def test_probe_settings_come_from_the_environment_and_private_ranges_are_off_by_default():
    from broker_api.settings import Settings

    default = MatchmakerSettings.from_env({})
    assert (default.probe_private, default.probe_timeout) == (False, 2.0)
    limits = (
        default.probes_per_account,
        default.probes_per_target,
        default.probes_per_ip,
        default.probe_window,
    )
    assert limits == (10, 2, 64, 60)
    assert MatchmakerSettings.from_env({"PROBE_PRIVATE_ADDRESSES": "on"}).probe_private
    assert Settings.from_env({"PROBE_TIMEOUT": "0.5"}).probe_timeout == 0.5
    with pytest.raises(ValueError, match="PROBE_PRIVATE_ADDRESSES"):
        Settings.from_env({"PROBE_PRIVATE_ADDRESSES": "maybe"})
    with pytest.raises(ValueError, match="PROBE_TIMEOUT"):
        Settings.from_env({"PROBE_TIMEOUT": "soon"})
