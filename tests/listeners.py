"""Real TCP listeners for probe tests: honest hosts that answer address probes, and
victims that only count who connects.

Every listener made here is closed after its test (``close_all``, an autouse fixture in
``tests/conftest.py``).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable

from peer import probe, wire
from peer.errors import PeerError
from peer.wire import Kind

_OPEN: list[Listener] = []


class Listener:
    """A loopback TCP listener whose accept loop runs ``handle`` on each connection,
    counting connections (``hits``)."""

    def __init__(self, handle: Callable[[socket.socket], None], port: int = 0) -> None:
        self._handle = handle
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.hits = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._loop, daemon=True, name=f"listener-{self.port}").start()
        _OPEN.append(self)

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.hits += 1
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError, PeerError):
                    self._handle(conn)

    def close(self) -> None:
        wire.close_quietly(self.sock)


def responder(sign: probe.Signer, port: int = 0) -> Listener:
    """A host that answers probes (``peer.probe.answer``) with ``sign``, on ``port``
    (default: a free one)."""

    def handle(conn: socket.socket) -> None:
        kind, payload = wire.read_frame(conn, max_frame=wire.JSON_LIMIT)
        if kind is Kind.PROBE:
            probe.answer(conn, payload, sign)

    return Listener(handle, port)


def victim() -> Listener:
    """A machine that takes connections and says nothing (it counts them)."""

    def handle(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            conn.recv(4096)

    return Listener(handle)


def close_all() -> None:
    while _OPEN:
        _OPEN.pop().close()
