"""Property tests of ``peer.wire.read_frame`` against hostile and broken byte streams.

``read_frame`` runs before a peer is authenticated, on bytes anyone can send, so its
contract is what keeps a port scanner, a buggy client or an attacker from hurting the
process: whatever arrives, it returns valid frames or raises ``ProtocolError``
(``ConnectionClosed`` on a clean close between frames), never another exception, never
hangs once the sender has closed, and never allocates more than its cap.

``tests/peer/test_wire.py`` already feeds random bytes and random headers in one
``sendall``; this file adds what that does not: valid streams damaged by flips,
insertions, deletions and truncation (with exact expectations for what must still
decode), delivery in arbitrary fragments by a writer thread (so partial ``recv``\\ s and
streams larger than the socket buffer are exercised), round trips of arbitrary
``write_frame`` calls, and time and memory bounds on huge declared lengths.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import resource
import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peer.errors import ConnectionClosed, ProtocolError
from peer.wire import DEFAULT_MAX_FRAME, HEADER, MAGIC, VERSION, Kind, read_frame, write_frame

#: Cap used by the stream tests: small enough that "within the cap" allocations are cheap.
CAP = 1 << 16
#: Seconds a reader may block before the test counts it as a hang.
READ_TIMEOUT = 5.0

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

Frame = tuple[Kind, bytes]


class _Recorder:
    """Stands in for a socket so ``write_frame`` itself produces the reference bytes."""

    def __init__(self) -> None:
        self.data = bytearray()

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        self.data += data


def encode(frames: Sequence[Frame]) -> tuple[bytes, list[int]]:
    """The bytes ``write_frame`` sends for ``frames``, and the offset where each ends."""
    recorder = _Recorder()
    ends = []
    for kind, payload in frames:
        write_frame(recorder, kind, [payload])  # type: ignore[arg-type]
        ends.append(len(recorder.data))
    return bytes(recorder.data), ends


@dataclass
class Outcome:
    """What a reader made of a stream: the frames it got, and how it stopped."""

    frames: list[Frame] = field(default_factory=list)
    error: ProtocolError | None = None


def feed(chunks: Sequence[bytes], max_frame: int = CAP) -> Outcome:
    """Send ``chunks`` from a writer thread, close, and read frames until an error.

    The writer runs concurrently so that streams larger than the socket buffer do not
    deadlock and so that the reader sees the fragments as separate ``recv`` results.
    Anything but a ``ProtocolError`` (a hang shows up as ``TimeoutError``) escapes and
    fails the test.
    """
    reader, writer = socket.socketpair()
    reader.settimeout(READ_TIMEOUT)
    writer.settimeout(READ_TIMEOUT)

    def write() -> None:
        # The reader may stop early (an error) and close: EPIPE/ECONNRESET are expected.
        with contextlib.suppress(OSError):
            for chunk in chunks:
                writer.sendall(chunk)
        writer.close()

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    outcome = Outcome()
    total = sum(len(c) for c in chunks)
    try:
        while True:
            try:
                kind, payload = read_frame(reader, max_frame=max_frame)
            except ProtocolError as exc:
                outcome.error = exc
                break
            assert isinstance(kind, Kind)
            assert len(payload) <= max_frame
            outcome.frames.append((kind, bytes(payload)))
            assert len(outcome.frames) * HEADER.size <= total, "more frames than the bytes allow"
    finally:
        reader.close()
        thread.join(READ_TIMEOUT)
    assert not thread.is_alive(), "writer still blocked after the reader closed"
    return outcome


def fragment(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    """Split ``data`` at the given offsets (clamped, sorted, deduplicated)."""
    points = sorted({min(max(c, 0), len(data)) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


kinds = st.sampled_from(list(Kind))
frames_st = st.lists(st.tuples(kinds, st.binary(max_size=300)), min_size=1, max_size=8)
cuts_st = st.lists(st.integers(0, 4000), max_size=12)


# -- valid streams -------------------------------------------------------------------


@FUZZ
@given(frames=frames_st, cuts=cuts_st)
def test_any_frames_round_trip_in_any_fragments(frames: list[Frame], cuts: list[int]) -> None:
    data, _ends = encode(frames)
    outcome = feed(fragment(data, cuts))
    assert outcome.frames == frames
    assert type(outcome.error) is ConnectionClosed


@FUZZ
@given(parts=st.lists(st.binary(max_size=200), max_size=6) | st.just([b"x" * 70_000, b"", b"y" * 5]))
def test_multi_part_payloads_arrive_joined(parts: list[bytes]) -> None:
    recorder = _Recorder()
    write_frame(recorder, Kind.RESULT, parts)  # type: ignore[arg-type]
    outcome = feed([bytes(recorder.data)], max_frame=1 << 20)
    assert outcome.frames == [(Kind.RESULT, b"".join(parts))]


# -- damaged streams -----------------------------------------------------------------


@FUZZ
@given(frames=frames_st, cut=st.integers(0, 10_000), cuts=cuts_st)
def test_truncation_anywhere_is_closed_or_protocol_error(
    frames: list[Frame], cut: int, cuts: list[int]
) -> None:
    """Frames wholly before the cut decode exactly; then a cut on a frame boundary is a
    clean close and any other cut a ProtocolError that is *not* a clean close."""
    data, ends = encode(frames)
    cut = cut % (len(data) + 1)
    outcome = feed(fragment(data[:cut], cuts))
    whole = sum(1 for end in ends if end <= cut)
    assert outcome.frames == frames[:whole]
    if cut in (0, *ends):
        assert type(outcome.error) is ConnectionClosed
    else:
        assert type(outcome.error) is ProtocolError
        assert "truncated" in str(outcome.error)


@dataclass(frozen=True)
class Mutation:
    """One edit of a byte stream at ``offset``: flip bits, insert or delete bytes."""

    op: str
    offset: int
    value: bytes

    def apply(self, data: bytes) -> tuple[bytes, int]:
        """The edited bytes and the first offset whose content changed."""
        at = self.offset % (len(data) + 1)
        if self.op == "flip" and at < len(data):
            mask = self.value[0] or 1
            return data[:at] + bytes([data[at] ^ mask]) + data[at + 1 :], at
        if self.op == "insert":
            return data[:at] + self.value + data[at:], at
        return data[:at] + data[at + len(self.value) :], at  # delete (or flip past the end)


mutations = st.builds(
    Mutation,
    st.sampled_from(["flip", "insert", "delete"]),
    st.integers(0, 10_000),
    st.binary(min_size=1, max_size=20),
)


@FUZZ
@given(frames=frames_st, edits=st.lists(mutations, min_size=1, max_size=4), cuts=cuts_st)
def test_mutated_streams_keep_the_intact_prefix(
    frames: list[Frame], edits: list[Mutation], cuts: list[int]
) -> None:
    """Whatever the damage, frames that end before it decode unchanged and the reader
    ends in a ProtocolError (never a hang, never another exception)."""
    data, ends = encode(frames)
    first_change = len(data)
    for edit in edits:
        data, at = edit.apply(data)
        first_change = min(first_change, at)
    outcome = feed(fragment(data, cuts))
    intact = sum(1 for end in ends if end <= first_change)
    assert outcome.frames[:intact] == frames[:intact]
    assert outcome.error is not None


def header(length: int, kind: int = int(Kind.TASK), magic: bytes = MAGIC, version: int = VERSION) -> bytes:
    return HEADER.pack(magic, version, kind, length)


@FUZZ
@given(
    # Mostly right values, so that each check is reached with the others passing.
    magic=st.just(MAGIC) | st.binary(min_size=4, max_size=4),
    version=st.just(VERSION) | st.integers(0, 255),
    kind=st.sampled_from([int(k) for k in Kind]) | st.integers(0, 255),
    length=st.integers(0, 2 * CAP),
    tail=st.binary(max_size=200),
    cuts=cuts_st,
)
def test_every_header_field_combination(
    magic: bytes, version: int, kind: int, length: int, tail: bytes, cuts: list[int]
) -> None:
    """Exactly the headers with right magic, version, known kind and length within the
    cap are accepted; each other field is refused with a message naming it."""
    outcome = feed(fragment(header(length, kind, magic, version) + tail, cuts))
    valid_kind = kind in {int(k) for k in Kind}
    if magic != MAGIC:
        assert "magic" in str(outcome.error)
    elif version != VERSION:
        assert "version" in str(outcome.error)
    elif not valid_kind:
        assert "unknown frame kind" in str(outcome.error)
    elif length > CAP:
        assert "exceeds" in str(outcome.error)
    elif length > len(tail):
        assert "truncated" in str(outcome.error) and not outcome.frames
    else:
        assert outcome.frames[0] == (Kind(kind), tail[:length])
    assert outcome.error is not None


# -- resource bounds -----------------------------------------------------------------


@contextlib.contextmanager
def peak_allocation() -> Iterator[list[int]]:
    """Yield a one-item list that holds the peak bytes allocated inside the block."""
    result = [0]
    tracemalloc.start()
    try:
        yield result
    finally:
        result[0] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


@contextlib.contextmanager
def address_space_headroom(extra: int = 128 * 1024 * 1024) -> Iterator[None]:
    """Limit this process to its current size plus ``extra`` while the block runs.

    A regression that allocated a declared length before checking it would zero-fill
    gigabytes (``bytearray(n)`` touches every page) and could take the machine down
    with it; under this limit it is a prompt MemoryError, i.e. an ordinary failure.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as statm:
        current = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = current + extra if hard == resource.RLIM_INFINITY else min(current + extra, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@settings(FUZZ, max_examples=60)
@given(length=st.integers(DEFAULT_MAX_FRAME + 1, 2**64 - 1) | st.just(2**40), kind=kinds)
def test_huge_declared_length_fails_fast_without_reading_or_allocating(length: int, kind: Kind) -> None:
    """A header claiming up to 16 EiB is refused from the header alone: quickly, with
    kilobytes allocated, and with the bytes behind it left unread."""
    reader, writer = socket.socketpair()
    with reader, writer:
        reader.settimeout(READ_TIMEOUT)
        writer.sendall(header(length, int(kind)) + b"payload that must stay unread")
        # The writer stays open: if read_frame tried to read the payload it would block.
        with address_space_headroom(), peak_allocation() as peak:
            started = time.perf_counter()
            with pytest.raises(ProtocolError, match="exceeds"):
                read_frame(reader)  # the default 256 MiB cap
            elapsed = time.perf_counter() - started
        assert elapsed < 0.5
        assert peak[0] < 256 * 1024
        assert reader.recv(100) == b"payload that must stay unread"


@settings(FUZZ, max_examples=40)
@given(length=st.integers(1, CAP), sent=st.integers(0, 100))
def test_allocation_never_exceeds_the_cap(length: int, sent: int) -> None:
    """A length within the cap may be allocated, but nothing beyond it, even when the
    sender then hangs up early."""
    with peak_allocation() as peak:
        outcome = feed([header(length) + b"z" * min(sent, length)])
    assert peak[0] < CAP + 256 * 1024
    if sent >= length:
        assert outcome.frames == [(Kind.TASK, b"z" * length)]
    else:
        assert "truncated" in str(outcome.error)


def test_stalled_sender_times_out_instead_of_hanging() -> None:
    """A peer that sends half a frame and goes quiet is a timeout (an OSError the caller
    handles as a slow peer), bounded by the socket's timeout, not a hang."""
    reader, writer = socket.socketpair()
    with reader, writer:
        reader.settimeout(0.3)
        writer.sendall(header(100) + b"only part")
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            read_frame(reader)
        assert time.monotonic() - started < 2
