"""The daemon's front door: connections not yet authenticated, and how many of them.

A stranger may connect as often as it likes and send nothing, half a hello or garbage.
`FrontDoor` reads hellos for every such connection in one selector thread and finishes
handshakes in a fixed number of threads, so no amount of connect/close cycles grows the
daemon's threads; everything a connection holds is dropped when it ends. `Gate` caps
the handshakes in progress, in total and per source address: a global cap alone would
let one source lock the session's own requester out.
"""

from __future__ import annotations

import logging
import queue
import selectors
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from peer import wire
from peer.errors import ConnectionClosed, ProtocolError
from peer.wire import Kind

log = logging.getLogger("peer")
T = TypeVar("T")
LINGER_BYTES = 64 * 1024
LINGER_SECONDS = 2.0


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


@dataclass(eq=False)
class _Visitor:
    """A connection not yet authenticated: its hello as far as it has arrived."""

    sock: socket.socket
    address: str
    source: str
    deadline: float
    header: bytearray = field(default_factory=lambda: bytearray(wire.HEADER.size))
    got: int = 0
    kind: Kind | None = None
    payload: memoryview | None = None
    filled: int = 0
    #: "hello" (the door reads it), "handshake" (a worker finishes it), "done".
    state: str = "hello"
    #: Bytes still to read and drop after a bad first frame (a lingering close).
    linger: int = 0
    expired: bool = False
    guard: socket.socket | None = None


class FrontDoor(Generic[T]):
    """The daemon's pre-authentication phase with a fixed number of threads.

    One thread runs a selector over the listening socket and every connection whose
    hello has not fully arrived, so a stranger who connects and sends nothing (or
    half a hello, or closes at once) costs a file descriptor and a few hundred bytes,
    never a thread. A complete hello goes to one of ``workers`` handshake threads,
    which run ``handshake(sock, address, kind, payload, timeout)`` (authorize, answer,
    TLS); what it returns (a socket and whatever else ``admit`` needs) is passed to
    ``admit``, which owns the connection from then on. ``None`` means the handshake
    failed and ``handshake`` has closed the socket.

    Every connection gets ``deadline`` seconds from accept to admission, whatever it
    does: the door thread closes a late hello itself and shuts a late handshake's
    socket down through a duplicate descriptor it keeps (the handshake's own socket
    object is detached by the TLS wrap, and the duplicate keeps the kernel socket
    alive, so the shutdown can never hit a descriptor number reused by another
    connection). The `Gate` is entered on accept and left exactly once, when the
    connection is admitted or dropped.
    """

    def __init__(
        self,
        listener: socket.socket,
        gate: Gate,
        *,
        handshake: Callable[[socket.socket, str, Kind, memoryview, float], tuple[socket.socket, T] | None],
        admit: Callable[[socket.socket, T, str], None],
        workers: int,
        deadline: float,
        accepted: Callable[[socket.socket], None] | None = None,
    ) -> None:
        self._listener = listener
        self._gate = gate
        self._handshake = handshake
        self._admit = admit
        self._deadline = deadline
        self._accepted = accepted
        self._visitors: set[_Visitor] = set()
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[_Visitor | None] = queue.SimpleQueue()
        self._stopping = False
        self._waker_r, self._waker_w = socket.socketpair()
        self._waker_r.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._threads = [threading.Thread(target=self._run, name="door", daemon=True)]
        self._threads += [
            threading.Thread(target=self._work, name=f"handshake-{n}", daemon=True) for n in range(workers)
        ]

    def start(self) -> None:
        self._listener.setblocking(False)
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._selector.register(self._waker_r, selectors.EVENT_READ, None)
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop accepting, drop every connection not yet admitted, join the threads."""
        self._stopping = True
        try:
            self._waker_w.send(b"x")
        except OSError:
            pass
        for _ in self._threads[1:]:
            self._jobs.put(None)
        for thread in self._threads:
            if thread.is_alive():
                thread.join(10)
        with self._lock:
            left = list(self._visitors)
        for visitor in left:
            self._expire(visitor)
        self._selector.close()
        self._waker_r.close()
        self._waker_w.close()

    def waiting(self) -> int:
        """Connections accepted and not yet admitted or dropped."""
        with self._lock:
            return len(self._visitors)

    # -- the door thread ------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping:
            with self._lock:
                soonest = min((v.deadline for v in self._visitors if not v.expired), default=None)
            timeout = 1.0 if soonest is None else min(1.0, max(0.0, soonest - time.monotonic()))
            try:
                events = self._selector.select(timeout)
            except OSError:
                return
            for key, _ in events:
                if key.fileobj is self._listener:
                    self._accept()
                elif key.fileobj is self._waker_r:
                    try:
                        self._waker_r.recv(64)
                    except OSError:
                        pass
                else:
                    self._read(key.data)
            now = time.monotonic()
            with self._lock:
                late = [v for v in self._visitors if v.deadline <= now and not v.expired]
            for visitor in late:
                log.info("handshake with %s took longer than %g s; closed", visitor.address, self._deadline)
                self._expire(visitor)

    def _accept(self) -> None:
        for _ in range(64):  # then let the other sockets have a turn
            try:
                sock, addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # EMFILE and friends: say so and keep serving the connections we have;
                # the short pause keeps a listener that stays readable from spinning.
                log.warning("accept failed: %s", exc)
                time.sleep(0.05)
                return
            source, address = addr[0], f"{addr[0]}:{addr[1]}"
            full = self._gate.enter(source)
            if full:
                log.info("refused %s: %s", address, full)
                wire.close_quietly(sock)
                continue
            visitor = _Visitor(sock, address, source, time.monotonic() + self._deadline)
            try:
                if self._accepted is not None:
                    self._accepted(sock)
                sock.setblocking(False)
                with self._lock:
                    self._visitors.add(visitor)
                self._selector.register(sock, selectors.EVENT_READ, visitor)
            except OSError as exc:
                log.info("connection from %s failed: %s", address, exc)
                self._drop(visitor)

    def _read(self, visitor: _Visitor) -> None:
        """Take what has arrived of ``visitor``'s first frame; hand it on once whole."""
        sock = visitor.sock
        if visitor.linger:
            self._linger(visitor)
            return
        try:
            while visitor.payload is None:
                n = sock.recv_into(memoryview(visitor.header)[visitor.got :])
                if n == 0:
                    raise ConnectionClosed("closed before its hello")
                visitor.got += n
                if visitor.got < wire.HEADER.size:
                    return
                visitor.kind, length = wire.parse_header(visitor.header, wire.JSON_LIMIT)
                visitor.payload = memoryview(bytearray(length))
            while visitor.filled < visitor.payload.nbytes:
                n = sock.recv_into(visitor.payload[visitor.filled :])
                if n == 0:
                    raise ConnectionClosed("closed in the middle of its hello")
                visitor.filled += n
        except (BlockingIOError, InterruptedError):
            return
        except ConnectionClosed as exc:
            log.debug("%s %s", visitor.address, exc)
            self._drop(visitor)
            return
        except ProtocolError as exc:
            log.info("handshake with %s failed: %s", visitor.address, exc)
            self._start_linger(visitor)
            return
        except OSError as exc:
            log.info("handshake with %s failed: %s", visitor.address, exc)
            self._drop(visitor)
            return
        self._selector.unregister(sock)
        try:
            sock.setblocking(True)
            guard = sock.dup()
        except OSError as exc:
            log.info("handshake with %s failed: %s", visitor.address, exc)
            self._drop(visitor, registered=False)
            return
        with self._lock:
            visitor.state, visitor.guard = "handshake", guard
        self._jobs.put(visitor)

    def _start_linger(self, visitor: _Visitor) -> None:
        """Not a frame: say nothing, but close gracefully. Closing a socket with unread
        bytes makes the kernel send a reset, which can reach the sender before it has
        even finished writing; so send our FIN now and read (and drop) what it still
        sends, at most `LINGER_BYTES` for at most `LINGER_SECONDS`, before closing."""
        try:
            visitor.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._drop(visitor)
            return
        visitor.linger = LINGER_BYTES
        visitor.deadline = min(visitor.deadline, time.monotonic() + LINGER_SECONDS)
        self._linger(visitor)

    def _linger(self, visitor: _Visitor) -> None:
        scratch = bytearray(4096)
        try:
            while visitor.linger > 0:
                n = visitor.sock.recv_into(scratch)
                if n == 0:
                    break
                visitor.linger -= n
        except (BlockingIOError, InterruptedError):
            if visitor.linger > 0:
                return
        except OSError:
            pass
        self._drop(visitor)

    def _drop(self, visitor: _Visitor, *, registered: bool = True) -> None:
        """Close a connection still in its hello phase (door thread only)."""
        if registered:
            try:
                self._selector.unregister(visitor.sock)
            except (KeyError, ValueError):
                pass
        wire.close_quietly(visitor.sock)
        self._leave(visitor)

    def _expire(self, visitor: _Visitor) -> None:
        """A connection over its deadline: closed if it is still ours, cut if a worker has it."""
        with self._lock:
            if visitor.state == "done" or visitor.expired:
                return
            visitor.expired = True
            state, guard = visitor.state, visitor.guard
            if state == "handshake" and guard is not None:
                try:
                    guard.shutdown(socket.SHUT_RDWR)  # wakes the worker blocked on it
                except OSError:
                    pass
        if state == "hello":
            self._drop(visitor)

    def _leave(self, visitor: _Visitor) -> bool:
        """Forget ``visitor`` and give its gate place back (once); whether it had expired."""
        with self._lock:
            if visitor.state == "done":
                return visitor.expired
            visitor.state = "done"
            self._visitors.discard(visitor)
            guard, visitor.guard = visitor.guard, None
        if guard is not None:
            guard.close()
        self._gate.leave(visitor.source)
        return visitor.expired

    # -- handshake threads ----------------------------------------------------------
    def _work(self) -> None:
        while (visitor := self._jobs.get()) is not None:
            result = None
            try:
                if not visitor.expired and visitor.kind is not None and visitor.payload is not None:
                    timeout = max(0.05, visitor.deadline - time.monotonic())
                    result = self._handshake(
                        visitor.sock, visitor.address, visitor.kind, visitor.payload, timeout
                    )
                else:
                    wire.close_quietly(visitor.sock)
            except Exception:  # a handshake thread must never die
                log.exception("handshake with %s: unexpected failure", visitor.address)
                wire.close_quietly(visitor.sock)
            expired = self._leave(visitor)
            visitor.payload = None
            if result is None:
                continue
            conn, extra = result
            if expired or self._stopping:
                wire.close_quietly(conn)
                continue
            try:
                self._admit(conn, extra, visitor.address)
            except Exception:
                log.exception("admitting %s: unexpected failure", visitor.address)
                wire.close_quietly(conn)
