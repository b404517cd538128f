"""Real peers for the requester-library tests: `python -m peer` processes against a
real broker stack (gunicorn, matchmaker, a private Redis from the Procfile)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from peer.api import BrokerClient
from scripts.stack import LocalStack, Process, free_port

PASSWORD = "a long test password"
# Small enough that bombs hit them fast, large enough for a forked daemon.
LIMITS = ["--memory", "1024", "--task-timeout", "5", "--cpu-seconds", "30", "--heartbeat", "2"]


def init_account(stack: LocalStack, home: Path, email: str, address: str | None = None) -> None:
    """``python -m peer init`` for a fresh account whose key pair lives in ``home``."""
    argv = [
        sys.executable,
        "-m",
        "peer",
        "--home",
        str(home),
        "init",
        "--broker",
        stack.url,
        "--email",
        email,
    ]
    if address:
        argv += ["--address", address]
    result = subprocess.run(
        argv,
        env={**os.environ, "COMPUTE_BROKER_PASSWORD": PASSWORD},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


class PeerProcess:
    """A contributor's daemon, serving ``jobs`` slots on a free port."""

    def __init__(self, stack: LocalStack, workdir: Path, name: str, jobs: int = 1, *extra: str) -> None:
        self.home = workdir / name
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.email = f"{name}-{time.monotonic_ns()}@example.org"
        init_account(stack, self.home, self.email, self.address)
        argv = [sys.executable, "-m", "peer", "--home", str(self.home), "serve", "--jobs", str(jobs)]
        argv += [
            "--port",
            str(self.port),
            "--host",
            "127.0.0.1",
            "--scratch",
            str(workdir / f"{name}-scratch"),
        ]
        self.process = Process(name, dict(os.environ), workdir, argv=[*argv, *LIMITS, *extra])
        self.wait_for("serving")
        account = BrokerClient(stack.url)
        account.login(self.email, PASSWORD)
        self.client = account

    def wait_for(self, text: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.process.output():
            if self.process.proc.poll() is not None:
                raise RuntimeError(f"peer exited:\n{self.process.output()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"peer never said {text!r}:\n{self.process.output()}")
            time.sleep(0.05)

    def output(self) -> str:
        return self.process.output()

    def stop(self) -> None:
        self.process.stop()
