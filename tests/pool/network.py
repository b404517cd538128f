"""Real peers for the requester-library tests: `python -m peer` processes against a
real broker stack (gunicorn, matchmaker, a private Redis from the Procfile)."""

from __future__ import annotations

from pathlib import Path

from peer.api import BrokerClient
from scripts.stack import LocalStack, Peer
from scripts.stack import init_account as stack_init_account

PASSWORD = "a long test password"
# Small enough that bombs hit them fast, large enough for a forked daemon.
LIMITS = ["--memory", "1024", "--task-timeout", "5", "--cpu-seconds", "30", "--heartbeat", "2"]


def init_account(stack: LocalStack, home: Path, email: str, address: str | None = None) -> None:
    """``python -m peer init`` for a fresh account whose key pair lives in ``home``."""
    stack_init_account(stack.url, home, email, PASSWORD, address)


class PeerProcess(Peer):
    """A contributor's daemon serving ``jobs`` slots with the test limits, started and
    ready; ``client`` is logged in to its account."""

    def __init__(self, stack: LocalStack, workdir: Path, name: str, jobs: int = 1, *extra: str) -> None:
        super().__init__(stack.url, workdir, name, password=PASSWORD, jobs=jobs, extra=(*LIMITS, *extra))
        self.wait_for("serving")
        self.client = BrokerClient(stack.url)
        self.client.login(self.email, PASSWORD)
