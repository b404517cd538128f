"""The front door: the handshake gate's global and per-source places, and the
selector that reads hellos with a fixed number of threads."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from peer import wire
from peer.door import FrontDoor, Gate
from peer.wire import Kind


def test_one_source_cannot_take_every_place() -> None:
    gate = Gate(total=4, per_source=2)
    assert gate.enter("a") is None and gate.enter("a") is None
    assert "from a" in (gate.enter("a") or "")
    assert gate.enter("b") is None and gate.enter("c") is None
    assert gate.enter("d") == "too many handshakes in progress"
    gate.leave("a")
    assert gate.enter("d") is None
    assert gate.in_progress() == 4


def test_places_come_back_and_sources_are_forgotten() -> None:
    gate = Gate(total=3, per_source=3)
    for _ in range(1000):
        assert gate.enter("x") is None
        gate.leave("x")
    assert gate.in_progress() == 0 and not gate._open


def test_nonsense_caps_are_refused() -> None:
    with pytest.raises(ValueError):
        Gate(total=2, per_source=3)


class _Door:
    """A `FrontDoor` on a loopback listener whose handshake records what it was given
    and, for a hello saying b"wait", blocks reading until its socket is cut."""

    def __init__(self, deadline: float = 5.0, total: int = 8, per_source: int = 8) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()
        self.gate = Gate(total, per_source)
        self.hellos: list[tuple[Kind, bytes]] = []
        self.admitted: list[str] = []
        self.cut = threading.Event()
        self.door = FrontDoor(
            self.listener,
            self.gate,
            handshake=self._handshake,
            admit=self._admit,
            workers=2,
            deadline=deadline,
        )
        self.door.start()

    def _handshake(self, sock, address, kind, payload, timeout):
        self.hellos.append((kind, bytes(payload)))
        if bytes(payload) == b"wait":
            sock.settimeout(30)
            if sock.recv(1) == b"":
                self.cut.set()
            sock.close()
            return None
        return sock, bytes(payload)

    def _admit(self, sock, extra, address) -> None:
        self.admitted.append(extra.decode())
        sock.close()

    def hello(self, payload: bytes) -> socket.socket:
        sock = socket.create_connection(self.address)
        wire.write_frame(sock, Kind.HELLO, [payload])
        return sock

    def close(self) -> None:
        self.door.stop()
        self.listener.close()


def _until(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_door_hands_whole_hellos_on_and_admits_them() -> None:
    door = _Door()
    try:
        with door.hello(b'{"a": 1}'):
            assert _until(lambda: door.admitted == ['{"a": 1}'])
        sock = socket.create_connection(door.address)  # a hello in three pieces
        frame = wire.HEADER.pack(wire.MAGIC, wire.VERSION, Kind.HELLO, 5) + b"piece"
        for part in (frame[:3], frame[3:18], frame[18:]):
            sock.sendall(part)
            time.sleep(0.05)
        assert _until(lambda: len(door.admitted) == 2) and door.admitted[1] == "piece"
        sock.close()
        assert _until(lambda: door.gate.in_progress() == 0 and door.door.waiting() == 0)
    finally:
        door.close()


def test_door_drops_garbage_oversized_and_truncated_hellos_unread() -> None:
    door = _Door()
    try:
        cases = [
            b"GET / HTTP/1.1\r\n\r\n",
            wire.HEADER.pack(wire.MAGIC, wire.VERSION, Kind.HELLO, 2**40),
            wire.HEADER.pack(wire.MAGIC, wire.VERSION, Kind.HELLO, 100) + b"half",
        ]
        for data in cases:
            with socket.create_connection(door.address) as sock:
                sock.sendall(data)
                if len(data) < 40:
                    sock.shutdown(socket.SHUT_WR)
                sock.settimeout(5)
                try:
                    assert sock.recv(10) == b""  # closed without an answer
                except ConnectionResetError:
                    pass
        assert door.hellos == [] and door.admitted == []
        assert _until(lambda: door.gate.in_progress() == 0)
    finally:
        door.close()


def test_door_deadline_closes_silent_visitors_and_cuts_slow_handshakes() -> None:
    door = _Door(deadline=0.5)
    try:
        silent = socket.create_connection(door.address)
        slow = door.hello(b"wait")  # reaches a handshake thread, which then blocks
        silent.settimeout(5)
        started = time.monotonic()
        assert silent.recv(1) == b""
        assert door.cut.wait(5) and time.monotonic() - started < 3
        assert _until(lambda: door.gate.in_progress() == 0 and door.door.waiting() == 0)
        assert door.admitted == []
        silent.close()
        slow.close()
    finally:
        door.close()


def test_door_threads_stay_fixed_over_many_visitors() -> None:
    door = _Door(total=64, per_source=64)
    try:
        threads = threading.active_count()
        for n in range(500):
            sock = socket.create_connection(door.address)
            if n % 2:
                sock.sendall(b"x" * 7)
            sock.close()
        assert _until(lambda: door.gate.in_progress() == 0)
        for _ in range(20):
            door.hello(b"{}").close()
        assert _until(lambda: door.gate.in_progress() == 0 and len(door.admitted) == 20)
        assert threading.active_count() == threads
        assert door.door.waiting() == 0
    finally:
        door.close()


def test_a_full_gate_refuses_at_the_door() -> None:
    door = _Door(total=2, per_source=2)
    try:
        held = [socket.create_connection(door.address) for _ in range(2)]
        assert _until(lambda: door.gate.in_progress() == 2)
        with socket.create_connection(door.address) as third:
            third.settimeout(5)
            try:
                assert third.recv(1) == b""
            except ConnectionResetError:
                pass
        for sock in held:
            sock.close()
        assert _until(lambda: door.gate.in_progress() == 0)
    finally:
        door.close()
