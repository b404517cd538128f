"""The peer protocol's frame format, in one place.

A frame is a fixed 16-byte header followed by a payload::

    magic b"CB01" | version u8 | kind u8 | 2 pad bytes | payload length u64

The length is checked against a cap before anything is allocated, so a hostile
header cannot make us reserve gigabytes. This module only moves bytes: it never
imports dill or pickle, which keeps "where do we unpickle?" a one-line grep
(`peer/codec.py`).
"""

from __future__ import annotations

import json
import mmap
import socket
import struct
import threading
from collections.abc import Sequence
from enum import IntEnum
from typing import Any

from peer.errors import ConnectionClosed, ProtocolError

MAGIC = b"CB01"
VERSION = 1
HEADER = struct.Struct("!4sBBxxQ")
DEFAULT_MAX_FRAME = 256 * 1024 * 1024
JSON_LIMIT = 64 * 1024
MAX_BUFFERS = 65_536
#: A task's id, the first part of its TASK and RESULT frames (the requester and the daemon
#: both use it; here so that the requester library need not import the daemon).
TASK_ID = struct.Struct("!Q")

# Parts smaller than this are joined before sending: one syscall for the header and
# small pieces, while big buffers go out as they are, without a copy.
_COALESCE = 64 * 1024
_HUGE = 4 * 1024 * 1024
_COUNT = struct.Struct("!I")
_LENGTH = struct.Struct("!Q")

Buffer = bytes | bytearray | memoryview


class Kind(IntEnum):
    """What a frame carries; the numbers are part of the protocol."""

    HELLO = 1  # JSON: who I am and which session I speak for
    HELLO_OK = 2  # JSON: accepted (also a sandbox child's "ready")
    REFUSE = 3  # JSON: refused, with a reason; the sender then closes
    FUNC = 4  # buffers: code id, dill-pickled function
    TASK = 5  # buffers: task/code id, then codec.dumps_data((args, kwargs))
    RESULT = 6  # buffers: task id or metadata, then codec.dumps_result(result)
    ERROR = 7  # JSON: codec.format_exception(...) plus identifiers
    SHARE = 8  # buffers: a tracked object sent once
    DELTA = 9  # buffers: changes to a shared tracked object
    PING = 10
    PONG = 11
    BYE = 12  # orderly close
    PROBE = 13  # JSON: the broker's address probe (peer.probe), instead of a HELLO
    PROBE_OK = 14  # JSON: the host's signature over the probe


def close_quietly(sock: socket.socket) -> None:
    """Shut a socket down and close it, ignoring errors: ``shutdown`` first, because a
    plain ``close`` does not wake another thread blocked reading it, nor tell the other
    side at once."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


def close_with_bye(sock: socket.socket, write_lock: threading.Lock, *, wait: float = 1.0) -> None:
    """Say BYE (an orderly close) and close. The BYE is skipped when a writer holds
    ``write_lock`` for ``wait`` seconds: the other side stopped reading, and waiting on
    it would hang our own shutdown."""
    if write_lock.acquire(timeout=wait):
        try:
            write_frame(sock, Kind.BYE, [])
        except OSError:  # ssl.SSLError is an OSError
            pass
        finally:
            write_lock.release()
    close_quietly(sock)


def write_frame(sock: socket.socket, kind: Kind, payload_parts: Sequence[Buffer] = ()) -> None:
    """Send one frame whose payload is the concatenation of ``payload_parts``.

    Large parts are passed to ``sendall`` as they are, so a 100 MB array is never
    copied into a joined buffer; small parts are joined with the header first to
    keep the syscall count down for the many tiny frames of a busy session.
    """
    write_frames(sock, [(kind, payload_parts)])


def write_frames(sock: socket.socket, frames: Sequence[tuple[Kind, Sequence[Buffer]]]) -> None:
    """Send several frames, joining small ones into as few writes as possible: over
    TLS each write is a record and a syscall, which dominates for tiny tasks."""
    pending: list[Buffer] = []
    size = 0
    for kind, payload_parts in frames:
        views = [memoryview(part).cast("B") for part in payload_parts]
        pending.append(HEADER.pack(MAGIC, VERSION, int(kind), sum(view.nbytes for view in views)))
        size += HEADER.size
        for view in views:
            if view.nbytes < _COALESCE:
                pending.append(view)
                size += view.nbytes
                continue
            sock.sendall(b"".join(pending))
            pending, size = [], 0
            sock.sendall(view)
        if size >= _COALESCE:
            sock.sendall(b"".join(pending))
            pending, size = [], 0
    if pending:
        sock.sendall(b"".join(pending))


def read_frame(sock: socket.socket, max_frame: int = DEFAULT_MAX_FRAME) -> tuple[Kind, memoryview]:
    """Receive one frame and return its kind and payload.

    Raises:
        ConnectionClosed: the peer closed the connection before a new frame began.
        ProtocolError: bad magic, version or kind, a length over ``max_frame``, or
            a connection closed in the middle of a frame.
        OSError: transport errors (including ``TimeoutError``) propagate unchanged
            so the caller can tell a slow peer from a malformed one.
    """
    kind, length = read_header(sock, max_frame)
    return kind, read_payload(sock, kind, length)


def read_header(sock: socket.socket, max_frame: int = DEFAULT_MAX_FRAME) -> tuple[Kind, int]:
    """Receive and check a frame header only: its kind and payload length, so that a
    caller can account for the payload (or refuse it) before allocating it.

    Raises:
        ConnectionClosed, ProtocolError, OSError: as `read_frame`.
    """
    header = bytearray(HEADER.size)
    got = _recv_exactly(sock, memoryview(header))
    if got == 0:
        raise ConnectionClosed("connection closed")
    if got < HEADER.size:
        raise ProtocolError(f"truncated frame header: got {got} of {HEADER.size} bytes")
    return parse_header(header, max_frame)


def parse_header(header: Buffer, max_frame: int = DEFAULT_MAX_FRAME) -> tuple[Kind, int]:
    """Check a complete `HEADER`; return its kind and payload length.

    Raises:
        ProtocolError: bad magic, version or kind, or a length over ``max_frame``.
    """
    magic, version, kind_value, length = HEADER.unpack(header)
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version}, expected {VERSION}")
    try:
        kind = Kind(kind_value)
    except ValueError:
        raise ProtocolError(f"unknown frame kind {kind_value}") from None
    if length > max_frame:
        raise ProtocolError(f"frame of {length} bytes exceeds the {max_frame}-byte limit")
    return kind, length


def read_payload(sock: socket.socket, kind: Kind, length: int) -> memoryview:
    """Receive the ``length``-byte payload of a frame whose header `read_header` checked."""
    payload = allocate(length)
    got = _recv_exactly(sock, payload)
    if got < length:
        raise ProtocolError(f"truncated {kind.name} frame: got {got} of {length} bytes")
    return payload


def allocate(length: int) -> memoryview:
    """A writable buffer of ``length`` bytes for a payload to be received into.

    Big payloads get anonymous memory advised for transparent huge pages: filling
    100 MB of fresh 4 KiB pages costs the kernel ~25,000 page faults and zeroings
    (0.1-0.25 s on a small VM), against ~50 with 2 MiB pages (about 0.05 s), and each
    hop of a big argument or result lands in a fresh buffer.
    """
    if length < _HUGE:
        return memoryview(bytearray(length))
    region = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advise = getattr(mmap, "MADV_HUGEPAGE", None)
    if advise is not None:
        try:
            region.madvise(advise)
        except OSError:
            pass  # THP disabled: ordinary pages, as with a bytearray
    return memoryview(region)


def skip_payload(sock: socket.socket, kind: Kind, length: int, chunk: int = 1024 * 1024) -> None:
    """Read and drop a payload through one small buffer: a frame refused for its size
    leaves the stream in step without ever being held in memory."""
    scratch = memoryview(bytearray(min(chunk, length) or 1))
    left = length
    while left:
        n = sock.recv_into(scratch[: min(left, scratch.nbytes)])
        if n == 0:
            raise ProtocolError(f"truncated {kind.name} frame: {left} of {length} bytes missing")
        left -= n


def _recv_exactly(sock: socket.socket, view: memoryview) -> int:
    """Fill ``view`` with large ``recv_into`` calls; return the count read before EOF."""
    pos = 0
    size = view.nbytes
    while pos < size:
        n = sock.recv_into(view[pos:])
        if n == 0:
            break
        pos += n
    return pos


def pack_buffers(buffers: Sequence[Buffer]) -> list[Buffer]:
    """Lay out N buffers as one payload: a count, N lengths, then the buffers.

    Returns the parts for `write_frame` rather than one joined buffer, so pickle
    protocol-5 out-of-band buffers are sent straight from the memory they live in.
    """
    views = [memoryview(buf).cast("B") for buf in buffers]
    head = _COUNT.pack(len(views)) + b"".join(_LENGTH.pack(v.nbytes) for v in views)
    return [head, *views]


def unpack_buffers(payload: Buffer) -> list[memoryview]:
    """Split a `pack_buffers` payload into memoryviews slicing ``payload`` (no copies).

    Raises:
        ProtocolError: the count or lengths do not add up to the payload exactly.
    """
    view = memoryview(payload).cast("B")
    size = view.nbytes
    if size < _COUNT.size:
        raise ProtocolError("multi-buffer payload shorter than its count")
    (count,) = _COUNT.unpack_from(view)
    if count > MAX_BUFFERS:
        # Each buffer becomes a memoryview object (~200 bytes) for 8 bytes of length:
        # an unbounded count would turn a 16 MB frame into gigabytes.
        raise ProtocolError(f"multi-buffer payload of {count} buffers exceeds {MAX_BUFFERS}")
    pos = _COUNT.size + count * _LENGTH.size
    if pos > size:
        raise ProtocolError(f"multi-buffer payload too short for {count} lengths")
    lengths = struct.unpack_from(f"!{count}Q", view, _COUNT.size)
    if pos + sum(lengths) != size:
        raise ProtocolError("multi-buffer lengths do not match the payload size")
    out = []
    for length in lengths:
        out.append(view[pos : pos + length])
        pos += length
    return out


def encode_json(obj: dict[str, Any]) -> bytes:
    """Encode a small control message (HELLO, REFUSE, ERROR) as compact UTF-8 JSON."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def decode_json(payload: Buffer, limit: int = JSON_LIMIT) -> dict[str, Any]:
    """Decode a control message, accepting only a JSON object within ``limit`` bytes.

    JSON is parsed before the peer knows who is talking, so it is bounded and typed
    here rather than trusted.

    Raises:
        ProtocolError: too large, not UTF-8, not JSON, too deeply nested, or not
            an object.
    """
    view = memoryview(payload)
    if view.nbytes > limit:
        raise ProtocolError(f"JSON message of {view.nbytes} bytes exceeds {limit} bytes")
    try:
        obj = json.loads(bytes(view).decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"invalid JSON message: {exc}") from exc
    if not isinstance(obj, dict):
        raise ProtocolError(f"JSON message must be an object, got {type(obj).__name__}")
    return obj
