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


class ScriptedPeer:
    """A peer the broker matches like any other, which answers the n-th task it gets
    with the n-th of the chosen result buffers (the last one repeats): a malicious
    peer speaking the real protocol over mutual TLS, sending bytes of our choosing."""

    def __init__(self, stack: LocalStack, home: Path, results: list[list[bytes]]) -> None:
        import socket
        import threading

        from peer.identity import Identity
        from peer.runtime import local_runtime
        from scripts.stack import free_port

        self.identity = Identity.create(home)
        self.listener = socket.create_server(("127.0.0.1", free_port()))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.client = BrokerClient(stack.url, identity=self.identity)
        self.client.signup(
            f"scripted-{id(self)}@example.org", PASSWORD, self.identity.public_key, self.address
        )
        self.client.set_jobs(1, local_runtime())
        self.results, self.sent = results, 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import ssl

        from peer import wire
        from peer.channel import accept
        from peer.errors import PeerError
        from peer.wire import Kind

        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            try:
                tls, _ = accept(sock, self.identity, lambda hello: None)
                while True:
                    kind, payload = wire.read_frame(tls)
                    if kind is Kind.PING:
                        wire.write_frame(tls, Kind.PONG, [payload])
                    elif kind is Kind.TASK:
                        task_id = bytes(wire.unpack_buffers(payload)[0])
                        result = self.results[min(self.sent, len(self.results) - 1)]
                        self.sent += 1
                        wire.write_frame(tls, Kind.RESULT, wire.pack_buffers([task_id, *result]))
            except (PeerError, OSError, ssl.SSLError):
                sock.close()

    def close(self) -> None:
        self.client.set_jobs(0)
        self.listener.close()
