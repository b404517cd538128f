"""Frame format tests over real socketpairs: round trips, caps and malformed input."""

from __future__ import annotations

import ast
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peer import wire
from peer.errors import ConnectionClosed, ProtocolError
from peer.wire import Kind


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    b.settimeout(5)  # a hang becomes a test failure, not a stuck run
    yield a, b
    a.close()
    b.close()


def header(length: int, *, magic: bytes = wire.MAGIC, version: int = wire.VERSION, kind: int = 5) -> bytes:
    return wire.HEADER.pack(magic, version, kind, length)


@pytest.mark.parametrize("kind", list(Kind))
def test_every_kind_round_trips(pair, kind: Kind) -> None:
    a, b = pair
    wire.write_frame(a, kind, [b"hello ", bytearray(b"wor"), memoryview(b"ld")])
    got_kind, payload = wire.read_frame(b)
    assert got_kind is kind
    assert bytes(payload) == b"hello world"


def test_empty_payload(pair) -> None:
    a, b = pair
    wire.write_frame(a, Kind.PING)
    assert wire.read_frame(b) == (Kind.PING, memoryview(b""))


def test_consecutive_frames_keep_their_boundaries(pair) -> None:
    a, b = pair
    for i in range(50):
        wire.write_frame(a, Kind.TASK, [str(i).encode()])
    assert [bytes(wire.read_frame(b)[1]) for _ in range(50)] == [str(i).encode() for i in range(50)]


def test_large_frame_mixes_big_and_small_parts(pair) -> None:
    a, b = pair
    big = bytes(range(256)) * (64 * 1024)  # 16 MiB, larger than the socket buffer
    parts = [b"head", big, b"middle", big[:100_000], b"tail"]
    writer = threading.Thread(target=wire.write_frame, args=(a, Kind.RESULT, parts))
    writer.start()
    kind, payload = wire.read_frame(b)
    writer.join()
    assert kind is Kind.RESULT
    assert payload == b"".join(parts)


def test_oversized_length_is_refused_before_allocating(pair) -> None:
    a, b = pair
    a.sendall(header(2**62))  # allocating this would raise MemoryError, not ProtocolError
    with pytest.raises(ProtocolError, match="exceeds"):
        wire.read_frame(b)


def test_max_frame_is_configurable(pair) -> None:
    a, b = pair
    wire.write_frame(a, Kind.TASK, [b"x" * 101])
    with pytest.raises(ProtocolError, match="101 bytes exceeds the 100-byte limit"):
        wire.read_frame(b, max_frame=100)


def test_frame_at_the_cap_is_accepted(pair) -> None:
    a, b = pair
    wire.write_frame(a, Kind.TASK, [b"x" * 100])
    assert len(wire.read_frame(b, max_frame=100)[1]) == 100


def test_clean_close_between_frames(pair) -> None:
    a, b = pair
    wire.write_frame(a, Kind.BYE)
    a.close()
    assert wire.read_frame(b)[0] is Kind.BYE
    with pytest.raises(ConnectionClosed):
        wire.read_frame(b)


def test_truncated_header(pair) -> None:
    a, b = pair
    a.sendall(header(10)[:7])
    a.close()
    with pytest.raises(ProtocolError, match="truncated frame header: got 7 of 16"):
        wire.read_frame(b)


def test_truncated_payload(pair) -> None:
    a, b = pair
    a.sendall(header(10) + b"12345")
    a.close()
    with pytest.raises(ProtocolError, match="truncated TASK frame: got 5 of 10"):
        wire.read_frame(b)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (header(0, magic=b"HTTP"), "bad frame magic"),
        (header(0, version=2), "unsupported protocol version 2"),
        (header(0, kind=0), "unknown frame kind 0"),
        (header(0, kind=200), "unknown frame kind 200"),
    ],
)
def test_bad_header_fields(pair, raw: bytes, message: str) -> None:
    a, b = pair
    a.sendall(raw)
    with pytest.raises(ProtocolError, match=message):
        wire.read_frame(b)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=4096) | st.builds(lambda k, n, tail: header(n, kind=k) + tail,
       st.integers(0, 255), st.integers(0, 2**64 - 1), st.binary(max_size=64)))  # fmt: skip
def test_arbitrary_bytes_end_in_protocol_error_or_frames(data: bytes) -> None:
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(5)
        a.sendall(data)
        a.close()
        frames = 0
        while True:
            try:
                kind, _payload = wire.read_frame(b, max_frame=1 << 20)
            except ProtocolError:
                break
            assert isinstance(kind, Kind)
            frames += 1
            assert frames <= len(data) // wire.HEADER.size


def test_pack_unpack_buffers_are_views_of_the_payload() -> None:
    buffers = [b"", b"abc", bytearray(b"\x00" * 10), memoryview(b"xyz")]
    payload = bytearray(b"".join(bytes(p) for p in wire.pack_buffers(buffers)))
    views = wire.unpack_buffers(payload)
    assert [bytes(v) for v in views] == [b"", b"abc", b"\x00" * 10, b"xyz"]
    views[1][0] = ord("A")  # a view, not a copy
    assert b"Abc" in payload


def test_pack_buffers_does_not_copy_big_buffers() -> None:
    big = bytearray(1 << 20)
    parts = wire.pack_buffers([big])
    assert parts[1].obj is big


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x00\x00",
        struct.pack("!I", 3) + struct.pack("!Q", 1),
        struct.pack("!IQ", 1, 5) + b"abc",
        struct.pack("!IQ", 1, 2) + b"abc",
        struct.pack("!I", 2**32 - 1),
    ],
)
def test_unpack_buffers_rejects_inconsistent_payloads(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        wire.unpack_buffers(payload)


@given(st.binary(max_size=512))
def test_unpack_buffers_never_fails_otherwise(payload: bytes) -> None:
    try:
        views = wire.unpack_buffers(payload)
    except ProtocolError:
        return
    assert sum(len(v) for v in views) <= len(payload)


def test_json_round_trip() -> None:
    message = {"session": "s1", "user": "ann", "n": [1, 2.5, None], "é": True}
    assert wire.decode_json(wire.encode_json(message)) == message


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"[1, 2]", "must be an object"),
        (b'"text"', "must be an object"),
        (b"{bad json", "invalid JSON"),
        (b"\xff\xfe{}", "invalid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "exceeds"),
        (b"{" + b'"a":' * 200 + b"}", "invalid JSON"),
    ],
)
def test_decode_json_rejects(payload: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        wire.decode_json(payload)


def test_decode_json_deep_nesting_within_limit() -> None:
    with pytest.raises(ProtocolError):
        wire.decode_json(b"[" * 30_000 + b"]" * 30_000)


def test_decode_json_limit_is_configurable() -> None:
    with pytest.raises(ProtocolError, match="exceeds 10 bytes"):
        wire.decode_json(b'{"a": "0123456789"}', limit=10)


def test_wire_never_imports_a_deserializer() -> None:
    """The frame layer must stay safe to run before authentication."""
    tree = ast.parse(Path(wire.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"pickle", "dill", "marshal", "shelve"}


def test_buffer_count_is_capped() -> None:
    """An unbounded count would make a small frame cost a memoryview object per 8
    bytes: gigabytes from a 16 MB frame."""
    payload = struct.pack("!I", wire.MAX_BUFFERS + 1) + bytes(8 * (wire.MAX_BUFFERS + 1))
    with pytest.raises(ProtocolError, match="exceeds"):
        wire.unpack_buffers(payload)


def test_a_big_payload_lands_in_a_writable_buffer_of_its_exact_size() -> None:
    """Big payloads are received into huge-page-advised anonymous memory, not a bytearray;
    what the caller gets must behave the same: exact size, writable, the bytes sent."""
    import socket
    import threading

    from peer import wire

    body = bytes(range(256)) * (40 * 1024)  # 10 MiB: over the huge-buffer threshold
    a, b = socket.socketpair()
    with a, b:
        sender = threading.Thread(target=wire.write_frame, args=(a, wire.Kind.TASK, [body]))
        sender.start()
        kind, payload = wire.read_frame(b)
        sender.join()
    assert kind is wire.Kind.TASK
    assert payload.nbytes == len(body) and not payload.readonly
    assert payload == body
    payload[0] = 7  # a task may modify what it received in place
