"""The daemon's front door: how many unauthenticated handshakes it holds at once.

A handshake holds a thread until the requester's hello is checked, so a stranger who
opens connections and never finishes them could take every place. A global cap alone
lets one source lock the session's own requester out; the gate therefore also caps the
handshakes of each source address, so a flood from one address leaves room for others.
"""

from __future__ import annotations

import threading
from collections import Counter


class Gate:
    """Admits at most ``total`` handshakes at once, and ``per_source`` from one address."""

    def __init__(self, total: int, per_source: int) -> None:
        if not 0 < per_source <= total:
            raise ValueError("need 0 < per_source <= total")
        self.total, self.per_source = total, per_source
        self._open: Counter[str] = Counter()
        self._count = 0
        self._lock = threading.Lock()

    def enter(self, source: str) -> str | None:
        """Take a place for ``source``; the reason when there is none."""
        with self._lock:
            if self._open[source] >= self.per_source:
                return f"too many handshakes from {source} in progress"
            if self._count >= self.total:
                return "too many handshakes in progress"
            self._open[source] += 1
            self._count += 1
            return None

    def leave(self, source: str) -> None:
        """Give back a place taken by `enter`."""
        with self._lock:
            self._open[source] -= 1
            if self._open[source] <= 0:
                del self._open[source]
            self._count -= 1

    def in_progress(self) -> int:
        with self._lock:
            return self._count
