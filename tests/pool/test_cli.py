"""``python -m peer``: help, one-line errors, status, and a clean SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from scripts.stack import free_port
from tests.pool.network import PASSWORD, PeerProcess


def peer_cli(
    *args: str, home=None, password: str = PASSWORD, timeout: float = 60
) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "peer"]
    if home is not None:
        argv += ["--home", str(home)]
    env = {**os.environ, "COMPUTE_BROKER_PASSWORD": password}
    return subprocess.run([*argv, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("command", [[], ["init"], ["serve"], ["status"]])
def test_every_command_has_help(command):
    result = peer_cli(*command, "--help")
    assert result.returncode == 0 and "usage: python -m peer" in result.stdout


def _one_line_error(result: subprocess.CompletedProcess, words: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("peer: error:"), result.stderr
    assert words in lines[0], lines[0]


def test_wrong_password_is_one_line(stack, tmp_path):
    assert (
        peer_cli("init", "--broker", stack.url, "--email", "cli@example.org", home=tmp_path / "a").returncode
        == 0
    )
    result = peer_cli(
        "init",
        "--broker",
        stack.url,
        "--email",
        "cli@example.org",
        home=tmp_path / "b",
        password="not the password",
    )
    _one_line_error(result, "wrong password for cli@example.org")


def test_unreachable_broker_is_one_line(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    result = peer_cli("init", "--broker", url, "--email", "x@example.org", home=tmp_path)
    _one_line_error(result, f"cannot reach the broker at {url}")


def test_serving_without_init_is_one_line(tmp_path):
    _one_line_error(peer_cli("serve", home=tmp_path), "run `python -m peer init` first")


def test_port_in_use_is_one_line(stack, tmp_path):
    home = tmp_path / "busy"
    assert peer_cli("init", "--broker", stack.url, "--email", "busy@example.org", home=home).returncode == 0
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = peer_cli("serve", "--port", str(port), "--host", "127.0.0.1", home=home)
    _one_line_error(result, f"cannot listen on 127.0.0.1:{port}")


def test_status_and_sigterm_drain(stack, workdir, requester):
    peer = PeerProcess(stack, workdir, "cli-peer", 2)
    try:
        status = peer_cli("status", home=peer.home)
        assert status.returncode == 0, status.stderr
        assert peer.email in status.stdout and "slots     2" in status.stdout
        assert peer.client.me()["jobs"] == 2
        os.kill(peer.process.proc.pid, signal.SIGTERM)
        assert peer.process.proc.wait(30) == 0
        assert "stopped after" in peer.output()
        assert peer.client.me()["jobs"] == 0  # withdrawn from the broker
    finally:
        peer.stop()


def test_sigterm_lets_running_tasks_finish(stack, workdir, requester):
    from peer.pool import Pool

    peer = PeerProcess(stack, workdir, "drain-peer", 1)  # the only peer offering slots now
    try:
        with Pool(1, home=requester, broker=stack.url, timeout=20) as pool:
            assert pool.submit(abs, -1).result(30) == 1
            assert list(pool.shares) == [peer.address]
            future = pool.submit(time.sleep, 2)
            time.sleep(0.5)
            os.kill(peer.process.proc.pid, signal.SIGTERM)
            assert future.result(30) is None  # the running task finished and was delivered
        assert peer.process.proc.wait(30) == 0
    finally:
        peer.stop()


def _files_holding(home, secret: str) -> list[str]:
    return [str(p) for p in home.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def test_no_file_under_the_home_holds_the_password(stack, workdir, requester):
    import json

    peer = PeerProcess(stack, workdir, "no-secret-peer", 1)
    try:
        assert peer.client.me()["jobs"] == 1  # init and serve both ran
        for home in (peer.home, requester):
            assert _files_holding(home, PASSWORD) == []
            assert "password" not in json.loads((home / "account.json").read_text())
    finally:
        peer.stop()
    assert _files_holding(peer.home, PASSWORD) == []


def test_an_old_account_file_loses_its_password(stack, tmp_path):
    import json

    home = tmp_path / "old"
    assert peer_cli("init", "--broker", stack.url, "--email", "old@example.org", home=home).returncode == 0
    path = home / "account.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "password": PASSWORD}))
    status = peer_cli("status", home=home, password="")
    assert status.returncode == 0, status.stderr
    assert _files_holding(home, PASSWORD) == []


def test_init_counts_no_password_failure_and_key_login_beats_the_throttle(stack, tmp_path):
    """A new account's init does not start with a failing password log-in; once a
    stranger has used up the password throttle for the email, the peer still logs in
    (by key) when its token is no longer good."""
    import json

    import redis

    from broker_api.settings import default_redis_url
    from peer.api import BrokerClient, BrokerError

    conn = redis.Redis.from_url(default_redis_url(stack.data_dir))
    email = "throttled@example.org"
    home = tmp_path / "throttled"
    assert peer_cli("init", "--broker", stack.url, "--email", email, home=home).returncode == 0
    assert conn.get(f"cb:login-fail:email:{email}") is None
    stranger = BrokerClient(stack.url)
    statuses = set()
    for _ in range(8):
        try:
            stranger.login(email, "a stranger's guess")
        except BrokerError as exc:
            statuses.add(exc.status)
    assert 429 in statuses  # the password throttle for this email is exhausted
    path = home / "account.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "token": "revoked"}))
    status = peer_cli("status", home=home, password="")
    assert status.returncode == 0, status.stderr
    assert email in status.stdout
    assert json.loads(path.read_text())["token"] != "revoked"  # renewed by key
    conn.close()


def test_a_pool_logs_in_again_by_key(stack, requester, tmp_path):
    """A requester's Pool renews its token with its key: the account file holds none of
    the password, and a revoked token is no obstacle."""
    import json
    import shutil

    from peer.pool import Pool

    home = tmp_path / "pool-home"
    shutil.copytree(requester, home)
    path = home / "account.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "token": "revoked"}))
    pool = Pool(1, home=home, broker=stack.url, timeout=1)
    try:
        email = json.loads(path.read_text())["email"]
        assert pool._credentials == (email, None)
        pool._client.login(*pool._credentials)
        assert pool._client.me()["email"] == email
    finally:
        pool.shutdown(wait=False)
