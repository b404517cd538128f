"""Malicious results through a real Pool from a real (scripted) malicious peer.

The peer speaks the protocol over mutual TLS and answers tasks with frames of our
choosing: the attacks that walked around the old allow-list unpickler (a 1 GiB
bytearray from 74 bytes, a 2 GiB numpy void scalar, an object dtype in disguise, a
Fraction that held the GIL for a minute, class and wrapper tampering), redone against
the data format, plus what a data format invites (huge declared lengths, deep nesting,
colliding hashes, names of classes the requester does not have or that are not
classes). Each must end in a clean error at the requester, with its memory bounded,
and the next honest result from the same peer must decode right.
"""

from __future__ import annotations

import dataclasses
import fractions
import time
import tracemalloc

import msgpack
import numpy as np
import pytest

from peer import codec, datacodec
from peer.errors import DataError, UnsafeResultError
from peer.runtime import local_runtime
from tests.pool.network import ScriptedPeer


@dataclasses.dataclass
class Measurement:
    name: str
    values: list[float]


def _ext(code: int, data: bytes = b"") -> msgpack.ExtType:
    return msgpack.ExtType(code, data)


def _array(dtype: str, shape: tuple[int, ...], body: bytes, flags: int = 0) -> list[bytes]:
    head = datacodec._ARRAY_HEAD.pack(flags, len(shape), len(dtype)) + dtype.encode()
    frame = msgpack.packb(
        _ext(datacodec._NDARRAY, head + b"".join(d.to_bytes(8, "big") for d in shape) + body)
    )
    return [codec.DATA, frame]


def _data(value: object) -> list[bytes]:
    return [codec.DATA, msgpack.packb(value, use_bin_type=True)]


_M = 2**61 - 1
ATTACKS: dict[str, list[bytes]] = {
    # the old unpickler's walk-arounds, as data frames
    "1 GiB bytearray from a few bytes": [codec.DATA, b"\xc6\x40\x00\x00\x00" + b"x" * 64],
    "1 GiB bytearray out of band, buffer missing": _data(_ext(datacodec._BYTEARRAY_OOB, b"\x00\x00\x00\x00")),
    "numpy void scalar of 2 GiB": _array("|V2147483648", (), b"x" * 8, datacodec._IS_SCALAR),
    "numpy object dtype": _array("|O", (1,), b"A" * 8),
    "numpy structured dtype hiding an object": _array("i4,O", (1,), b"A" * 12),
    "numpy shape beyond its bytes": _array("<f8", (1 << 40,), b"\x00" * 8),
    "Fraction of a huge numerator": _data(_ext(datacodec._FRACTION, b"\x13\x88" + b"\x7f" * 5000 + b"\x01")),
    "Decimal 1e999999999": _data(_ext(datacodec._DECIMAL, b"1e999999999")),
    "int of 12,000 digits": _data(_ext(datacodec._BIGINT, b"\x7f" * 5000)),
    "a method name instead of a class": _data(
        [_ext(datacodec._DATACLASS, f"{__name__}:Measurement.__init__".encode()), {}]
    ),
    "a function instead of a class": _data([_ext(datacodec._DATACLASS, b"peer.codec:dumps_result"), {}]),
    "a class the requester does not have": _data([_ext(datacodec._DATACLASS, b"evil_module:Payload"), {}]),
    "a library class, not the requester's": _data([_ext(datacodec._ENUM, b"signal:Signals"), 9]),
    "an exception that is not builtin": _data([_ext(datacodec._EXCEPTION, b"os:system"), ["true"], None]),
    # what a data format invites
    "array header declaring 4 G items": [codec.DATA, b"\xdd\xff\xff\xff\xff\xc0"],
    "nested headers each declaring 1 M items": [codec.DATA, b"\xdd\x00\x10\x00\x00" * 4000],
    "nesting 100,000 deep": [codec.DATA, b"\x91" * 100_000 + b"\xc0"],
    "20,000 dict keys with one hash": [
        codec.DATA,
        b"\xdf"
        + (20_000).to_bytes(4, "big")
        + b"".join(
            msgpack.packb(_ext(datacodec._BIGINT, (k * _M).to_bytes(16, "big", signed=True))) + b"\xc0"
            for k in range(1, 20_001)
        ),
    ],
    "a marker smuggled into data": _data([1, _ext(datacodec._TUPLE)]),
    "a pickle labelled as a result": [
        codec.CODE,
        b"builtins.eval",
        codec.PICKLE,
        b"\x80\x05cbuiltins\neval\n.",
    ],
    "a bare pickle": [codec.PICKLE, b"\x80\x05cos\nsystem\n."],
}

HONEST = [
    Measurement("honest", [1.5, 2.5]),
    (1, frozenset({2})),
    {"k": bytearray(b"v"), 3: fractions.Fraction(1, 3)},
    np.arange(100_000, dtype=np.int64),
]


@pytest.fixture
def scripted(stack, requester, peers, tmp_path):
    """A pool whose only worker is a scripted peer answering attack, honest, attack,
    honest, ...; the real peers are paused meanwhile."""
    for peer in peers:
        peer.client.set_jobs(0)
    results = []
    for frame in ATTACKS.values():
        results += [frame, codec.dumps_result(HONEST)]
    fake = ScriptedPeer(stack, tmp_path / "scripted", results)
    from peer.pool import Pool

    pool = Pool(1, home=requester, broker=stack.url, timeout=20)
    try:
        yield pool
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        fake.close()
        for peer in peers:
            peer.client.set_jobs(1, local_runtime())


def test_each_malicious_result_fails_cleanly_and_the_next_honest_one_decodes(scripted):
    pool = scripted
    failures = []
    for name, frame in ATTACKS.items():
        size = sum(len(part) for part in frame)
        tracemalloc.start()
        started = time.monotonic()
        try:
            try:
                pool.submit(abs, -1).result(30)
            except (DataError, UnsafeResultError):
                pass
            else:
                failures.append(f"{name}: decoded")
            elapsed = time.monotonic() - started
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        if elapsed > 5:
            failures.append(f"{name}: took {elapsed:.1f} s")
        if peak > datacodec.MEMORY_FACTOR * size + (16 << 20):
            failures.append(f"{name}: peak {peak} bytes for a {size}-byte result")
        got = pool.submit(abs, -1).result(30)
        if got[:3] != HONEST[:3] or not np.array_equal(got[3], HONEST[3]):
            failures.append(f"{name}: the next honest result decoded as {got!r:.200}")
    assert not failures, "\n".join(failures)
    assert pool.rerun == 0  # a bad result fails its task; it does not cost the link


def test_a_requester_that_trusts_its_peers_unpickles_labelled_results(make_pool):
    """Control, through real peers: a result that is not data (a function) reaches a
    trusting requester, and a default one is told what it is and how to accept it."""
    with make_pool(1, trust_results=True) as pool:
        assert pool.submit(lambda: lambda x: x + 1).result(30)(1) == 2
    with make_pool(1) as pool:
        with pytest.raises(UnsafeResultError, match=r"holds a function.*trust_results=True"):
            pool.submit(lambda: lambda x: x + 1).result(30)
        assert pool.submit(Measurement, "m", [1.0]).result(30) == Measurement("m", [1.0])
