"""Address probes against real ``python -m peer`` daemons on a real stack (with its
prober): an honest peer proves its address at its front door; another account that
announces that peer's address is not proven, so requesters are never sent there."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from peer.api import BrokerClient
from peer.identity import Identity
from peer.runtime import local_runtime
from scripts.stack import LocalStack
from tests.pool.network import PASSWORD, PeerProcess
from tests.pool.test_cli import peer_cli


def _proof_becomes(client: BrokerClient, state: str, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        proof = client.me()["addressProof"]
        if proof["state"] == state or time.monotonic() > deadline:
            return proof
        time.sleep(0.1)


def test_a_real_peer_proves_its_address_and_status_shows_it(stack: LocalStack, workdir: Path) -> None:
    peer = PeerProcess(stack, workdir, "proving", 1)
    try:
        assert _proof_becomes(peer.client, "proven")["state"] == "proven"
        status = peer_cli("status", home=peer.home)
        assert status.returncode == 0, status.stderr
        assert f"address   {peer.address} (proven)" in status.stdout
        assert "answered an address probe" in peer.output()
    finally:
        peer.stop()


def test_another_account_announcing_a_real_peers_address_is_not_proven(
    stack: LocalStack, workdir: Path, tmp_path: Path
) -> None:
    honest = PeerProcess(stack, workdir, "reflector-victim", 1)
    try:
        assert _proof_becomes(honest.client, "proven")["state"] == "proven"
        identity = Identity.create(tmp_path / "attacker")
        attacker = BrokerClient(stack.url, identity=identity)
        attacker.signup(
            f"attacker-{time.monotonic_ns()}@example.org", PASSWORD, identity.public_key, honest.address
        )
        attacker.set_jobs(64, local_runtime())
        proof = _proof_becomes(attacker, "failed")
        assert proof["state"] == "failed" and "registered key" in proof["detail"], proof
        for _ in range(5):
            attacker.heartbeat()  # no further probes of the same address
        time.sleep(1)
        assert honest.output().count("answered an address probe") == 2  # its own, the attacker's
        assert honest.client.me()["addressProof"]["state"] == "proven"
        attacker.set_jobs(0)
    finally:
        honest.stop()
