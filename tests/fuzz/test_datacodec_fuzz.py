"""Property tests of `peer.datacodec`: structured values round trip exactly, and any
bytes at all either decode or raise `DataError`, quickly and within a memory bound.

The decoder runs on the requester over bytes a stranger's peer chose, so "any bytes"
is its real input. Raw bytes are fuzzed three ways: random, valid frames damaged by
flips/insertions/truncation, and frames spliced from the format's own building blocks
(extension headers, markers, length prefixes), which random bytes rarely reach.
"""

from __future__ import annotations

import datetime
import decimal
import fractions
import math
import pathlib
import signal
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from peer import datacodec
from peer.errors import DataError
from tests.peer.test_datacodec import Color, Level, Pair, Point

FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
#: Seconds one decode may take before the example counts as a hang.
TIMEOUT = 2.0


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Fail the example if the body runs longer than ``seconds`` (SIGALRM: main thread)."""

    def expired(signum: int, frame: Any) -> None:
        raise TimeoutError(f"decode took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def decode_bounded(buffers: list[bytes]) -> None:
    """Decode hostile buffers: a value or DataError, in time, within the memory bound."""
    size = sum(len(b) for b in buffers)
    tracemalloc.start()
    started = time.monotonic()
    try:
        with time_limit(TIMEOUT):  # interrupts Python code; C code is caught by the check below
            try:
                datacodec.loads(buffers)
            except DataError:
                pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < TIMEOUT
    assert peak <= datacodec.MEMORY_FACTOR * size + (1 << 20), (peak, size)


# -- structured values ---------------------------------------------------------------

finite = st.floats(allow_nan=False)
ints = st.integers(min_value=-(10**400), max_value=10**400) | st.integers(-(2**64), 2**64)
hashable_leaves = st.one_of(
    st.none(),
    st.booleans(),
    ints,
    finite,
    st.text(max_size=20),
    st.binary(max_size=20),
    st.complex_numbers(allow_nan=False),
    st.dates(),
    st.times(timezones=st.none() | st.just(datetime.UTC)),
    st.datetimes(timezones=st.none() | st.just(datetime.timezone(datetime.timedelta(hours=-3)))),
    st.timedeltas(),
    st.decimals(allow_nan=False, places=None).filter(
        lambda d: not d.is_finite() or abs(d.as_tuple().exponent) <= 4300
    ),
    st.fractions(),
    st.uuids(),
    st.text(max_size=10).map(pathlib.PurePosixPath),
    st.sampled_from(list(Color) + list(Level)),
)
leaves = hashable_leaves | st.binary(max_size=50).map(bytearray)
arrays = hnp.arrays(
    dtype=hnp.scalar_dtypes() | hnp.array_dtypes(allow_subarrays=True),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=4),
)


def containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    keys = (
        hashable_leaves
        | st.tuples(hashable_leaves, hashable_leaves)
        | st.frozensets(hashable_leaves, max_size=3)
    )
    return st.one_of(
        st.lists(children, max_size=5),
        st.tuples(children, children),
        st.dictionaries(keys, children, max_size=5),
        st.sets(hashable_leaves, max_size=5),
        st.frozensets(hashable_leaves, max_size=5),
        st.builds(Point, st.integers(), finite, st.lists(st.text(max_size=5), max_size=3)),
        st.builds(Pair, children, children),
        st.builds(ValueError, st.text(max_size=10), children),
    )


values = st.recursive(leaves, containers, max_leaves=30)


def same(a: Any, b: Any) -> bool:
    """Equality that also checks types all the way down (1 == 1.0 == True is not enough)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, BaseException):
        return a.args == b.args or all(same(x, y) for x, y in zip(a.args, b.args, strict=True))
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(v, b[k]) for k, v in a.items())
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return bool(a == b)


@FUZZ
@given(values)
def test_structured_values_round_trip_exactly(value: Any) -> None:
    got = datacodec.loads(datacodec.dumps(value))
    assert same(got, value), (got, value)


@FUZZ
@given(arrays)
def test_numpy_arrays_of_any_plain_dtype_round_trip(array: np.ndarray) -> None:
    got = datacodec.loads(datacodec.dumps(array))
    assert same(got, array)


# -- raw bytes -------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=2000), st.lists(st.binary(max_size=100), max_size=2))
def test_random_bytes_decode_or_fail_cleanly(frame: bytes, oob: list[bytes]) -> None:
    decode_bounded([frame, *oob])


@st.composite
def damaged(draw: st.DrawFn) -> list[bytes]:
    frame, *oob = (bytes(b) for b in datacodec.dumps(draw(values)))
    data = bytearray(frame)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        how = draw(st.sampled_from(["flip", "insert", "delete", "cut", "big"]))
        if how == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif how == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif how == "delete":
            del data[at]
        elif how == "cut":
            del data[at:]
        else:
            data[at : at + 5] = draw(st.sampled_from([b"\xdd\xff\xff\xff\xff", b"\xdb\x7f\xff\xff\xff"]))
    return [bytes(data), *oob]


@FUZZ
@given(damaged())
def test_damaged_frames_decode_or_fail_cleanly(buffers: list[bytes]) -> None:
    decode_bounded(buffers)


def _block(code: int) -> st.SearchStrategy[bytes]:
    return st.binary(max_size=40).map(lambda data: msgpack.packb(msgpack.ExtType(code, data)))


codes = [c for c in range(0, 40)]
blocks = st.one_of(
    st.sampled_from(
        [b"\x91", b"\x92", b"\x93", b"\xdc\x00\x10", b"\x81", b"\x82", b"\xc0", b"\x01", b"\xa1a"]
    ),
    st.sampled_from(codes).flatmap(_block),
    st.sampled_from([datacodec._DATACLASS, datacodec._NAMEDTUPLE, datacodec._ENUM, datacodec._EXCEPTION]).map(
        lambda code: msgpack.packb(
            msgpack.ExtType(
                code, f"{Point.__module__}:{['Point', 'Pair', 'Color', 'Level'][code % 4]}".encode()
            )
        )
    ),
    st.sampled_from([b"\xd4\x01\x00", b"\xd4\x02\x00", b"\xc7\x00\x01", b"\xc7\x00\x02", b"\xc7\x00\x03"]),
    st.sampled_from([msgpack.packb(msgpack.ExtType(datacodec._BYTEARRAY_OOB, b"\x00\x00\x00\x00"))]),
)


@FUZZ
@given(st.lists(blocks, max_size=60), st.lists(st.binary(max_size=64), max_size=2))
def test_frames_spliced_from_the_formats_parts_decode_or_fail_cleanly(
    parts: list[bytes], oob: list[bytes]
) -> None:
    decode_bounded([b"".join(parts), *oob])


def test_known_expensive_values_still_decode_in_time() -> None:
    """The biggest legal leaves: ints of 4,300 digits, Fractions and Decimals at the bound."""
    big = 10**4299
    value = [big] * 100 + [fractions.Fraction(big, big - 1)] * 20 + [decimal.Decimal(f"{big}E-4300")] * 20
    with time_limit(TIMEOUT):
        got = datacodec.loads(datacodec.dumps(value))
        assert got == value
        str(got[0]), hash(got[-1]), got[-1] + 1, int(got[-1])


def test_uuid_and_path_leaves_are_exact() -> None:
    for value in (uuid.uuid4(), pathlib.PureWindowsPath("C:/x/y")):
        assert datacodec.loads(datacodec.dumps(value)) == value
