"""Codec tests: code by value, zero-copy data, and the data-only result decoder."""

from __future__ import annotations

import collections
import copyreg
import datetime
import decimal
import fractions
import math
import os
import pickle
import socket
import subprocess
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from peer import codec, wire
from peer.errors import ProtocolError, UnsafeResultError

SCALE = 3


def module_function(x: float) -> float:
    return math.sqrt(x) * SCALE


def through_code(fn: Any) -> Any:
    return codec.loads_code(codec.dumps_code(fn))


def through_data(obj: Any, *, trusted: bool = False) -> Any:
    """Encode as a result, flatten into one received buffer as the wire does, decode."""
    payload = bytearray(b"".join(bytes(p) for p in wire.pack_buffers(codec.dumps_result(obj))))
    return codec.loads_data(wire.unpack_buffers(payload), trusted=trusted)


def through_args(obj: Any) -> Any:
    """Encode as the requester's arguments (pickle) and decode as the sandbox does."""
    payload = bytearray(b"".join(bytes(p) for p in wire.pack_buffers(codec.dumps_data(obj))))
    return codec.loads_data(wire.unpack_buffers(payload), trusted=True)


def test_lambda_round_trips() -> None:
    assert through_code(lambda x, y=2: x**y)(3) == 9


def test_closure_round_trips() -> None:
    offset = 10

    def make(k: int) -> Any:
        return lambda x: x * k + offset

    assert through_code(make(4))(2) == 18


def test_recursive_local_function_round_trips() -> None:
    def fib(n: int) -> int:
        return n if n < 2 else fib(n - 1) + fib(n - 2)

    assert through_code(fib)(15) == 610


def test_module_function_with_globals_round_trips() -> None:
    assert through_code(module_function)(16) == 12


def test_dumps_code_refuses_non_callables() -> None:
    with pytest.raises(TypeError):
        codec.dumps_code(42)  # type: ignore[arg-type]


def test_code_id_is_stable_and_content_based() -> None:
    code = codec.dumps_code(lambda: 1)
    assert codec.code_id(code) == codec.code_id(bytes(code))
    assert codec.code_id(code) != codec.code_id(code + b"x")


PLAIN_DATA = [
    None,
    True,
    -(2**100),
    1.5,
    math.inf,
    2 - 3j,
    "text é",
    b"\x00bytes",
    bytearray(b"ba"),
    [1, [2, (3,)]],
    {"a": {1, 2}, "b": frozenset({3})},
    datetime.datetime(2024, 5, 1, 12, 30, tzinfo=datetime.timezone(datetime.timedelta(hours=2))),
    datetime.date(2024, 5, 1),
    datetime.time(1, 2, 3),
    datetime.timedelta(days=1, seconds=3),
    decimal.Decimal("1.10"),
    fractions.Fraction(1, 3),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    np.float64(2.5),
    np.int8(-3),
]

#: Values the old allow-list unpickler built that are not in the SPEC's data list: they
#: now travel pickled, for requesters that trust their peers only.
NOT_DATA = [
    range(1, 10, 2),
    slice(1, None, 2),
    type(None),
    collections.OrderedDict(b=1, a=2),
    collections.deque([1, 2], maxlen=5),
    collections.Counter("abca"),
    collections.defaultdict(list, {"a": [1]}),
    np.dtype("complex64"),
    np.dtype([("x", "<f4"), ("y", "<i8", (2,))]),
]


@pytest.mark.parametrize("value", PLAIN_DATA, ids=lambda v: type(v).__name__)
def test_plain_data_round_trips_through_the_untrusted_decoder(value: Any) -> None:
    assert codec.dumps_result(value)[0] == codec.DATA
    got = through_data(value)
    assert got == value
    assert type(got) is type(value)


@pytest.mark.parametrize("value", NOT_DATA, ids=lambda v: type(v).__name__)
def test_other_values_need_trust_and_the_refusal_names_their_type(value: Any) -> None:
    buffers = codec.dumps_result(value)
    assert buffers[0] == codec.CODE
    with pytest.raises(UnsafeResultError, match="trust_results=True") as caught:
        through_data(value)
    assert type(value).__name__ in str(caught.value)
    got = through_data(value, trusted=True)
    assert got == value and type(got) is type(value)


def test_defaultdict_keeps_its_factory_when_trusted() -> None:
    got = through_data(collections.defaultdict(list, {"a": [1]}), trusted=True)
    assert got == {"a": [1]}
    assert got["new"] == []


def test_arguments_still_travel_pickled_with_everything() -> None:
    for value in PLAIN_DATA + NOT_DATA:
        assert through_args(value) == value


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float64).reshape(3, 4),
        np.asfortranarray(np.arange(12, dtype=np.int32).reshape(3, 4)),
        np.arange(20)[::3],  # not contiguous: travels in band
        np.zeros((0, 3)),
        np.array([(1.0, 2)], dtype=[("a", "<f8"), ("b", "<i2")]),
        np.array(["ab", "c"]),
        np.array([np.datetime64("2024-01-01")]),
        np.ma.masked_array([1, 2]).data,
    ],
    ids=lambda a: f"{a.dtype}-{a.shape}",
)
def test_numpy_arrays_round_trip(array: np.ndarray) -> None:
    got = through_data(array)
    assert got.dtype == array.dtype
    np.testing.assert_array_equal(got, array)


def test_numpy_buffers_are_out_of_band_and_zero_copy_on_both_sides() -> None:
    array = np.arange(1 << 16, dtype=np.float64)
    flag, stream, *oob = codec.dumps_result(array)
    assert flag == codec.DATA
    assert len(stream) < 200  # the data is not in the pickle stream
    assert len(oob) == 1
    assert np.shares_memory(np.frombuffer(oob[0], dtype=np.float64), array)  # sender: no copy

    a, b = socket.socketpair()
    with a, b:
        b.settimeout(5)
        parts = wire.pack_buffers([flag, stream, *oob])
        import threading

        writer = threading.Thread(target=wire.write_frame, args=(a, wire.Kind.RESULT, parts))
        writer.start()
        _, payload = wire.read_frame(b)
        writer.join()
    got = codec.loads_data(wire.unpack_buffers(payload), trusted=False)
    np.testing.assert_array_equal(got, array)
    assert np.shares_memory(got, np.frombuffer(payload, dtype=np.uint8))  # receiver: no copy


def test_objects_the_c_pickler_refuses_fall_back_to_dill() -> None:
    value = {"f": lambda x: x + 1}
    buffers = codec.dumps_data(value)
    assert buffers[0] == codec.DILL
    assert through_args(value)["f"](1) == 2
    with pytest.raises(UnsafeResultError, match="never unpickled"):
        codec.loads_data(buffers, trusted=False)
    assert codec.dumps_result(value)[:3] == [codec.CODE, b"function", codec.DILL]
    assert through_data(value, trusted=True)["f"](1) == 2
    with pytest.raises(UnsafeResultError, match="holds a function"):
        through_data(value)


def test_main_references_fall_back_to_dill(monkeypatch: pytest.MonkeyPatch) -> None:
    class Point:
        pass

    Point.__module__ = "__main__"
    Point.__qualname__ = "Point"
    monkeypatch.setattr("__main__.Point", Point, raising=False)
    assert codec.dumps_data(Point())[0] == codec.DILL


def test_unpicklable_values_raise() -> None:
    with pytest.raises((TypeError, pickle.PicklingError)):
        codec.dumps_data(x for x in range(3))


# --- hostile results --------------------------------------------------------------


class Reducer:
    """Pickles as ``func(*args)``: what a malicious peer would put in a result."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.func, self.args


def hostile_payloads(target: Path) -> dict[str, Any]:
    touch = f"open({str(target)!r}, 'w').close()"
    return {
        "os.system": Reducer(os.system, f"touch {target}"),
        "subprocess.Popen": Reducer(subprocess.Popen, ["touch", str(target)]),
        "subprocess.check_call": Reducer(subprocess.check_call, ["touch", str(target)]),
        "builtins.eval": Reducer(eval, touch),
        "builtins.exec": Reducer(exec, touch),
        "builtins.open": Reducer(open, str(target), "w"),
        "nested in a list": [1, {"k": Reducer(eval, touch)}],
        "numpy object array": np.array([1, Reducer(os.system, f"touch {target}")], dtype=object),
        "builtins.getattr": Reducer(getattr, "text", "upper"),
        "class creation via type": Reducer(type, "X", (object,), {}),
    }


@pytest.mark.parametrize("name", list(hostile_payloads(Path("/x"))))
def test_untrusted_decoder_refuses_code(tmp_path: Path, name: str) -> None:
    target = tmp_path / "pwned"
    payload = hostile_payloads(target)[name]
    for buffers in (codec.dumps_result(payload), codec.dumps_data(payload)):
        with pytest.raises(UnsafeResultError):
            codec.loads_data(buffers, trusted=False)
    assert not target.exists()


def test_a_peer_chosen_type_name_is_printable_in_the_refusal() -> None:
    with pytest.raises(UnsafeResultError) as caught:
        codec.loads_data([codec.CODE, b"x\n\x1b[31mfake log line", codec.PICKLE, b"."], trusted=False)
    assert "\n" not in str(caught.value) and "\x1b" not in str(caught.value)


def test_refusal_names_the_type() -> None:
    buffers = codec.dumps_result([1, Reducer(os.system, "true")])
    with pytest.raises(UnsafeResultError, match=r"test_codec\.Reducer"):
        codec.loads_data(buffers, trusted=False)


def test_hostile_payload_really_runs_when_trusted(tmp_path: Path) -> None:
    """Control: the payloads above are effective, so the refusals are meaningful."""
    target = tmp_path / "pwned"
    codec.loads_data(codec.dumps_result(hostile_payloads(target)["builtins.eval"]), trusted=True)
    assert target.exists()


def test_numpy_object_array_with_code_is_refused(tmp_path: Path) -> None:
    array = np.array([lambda: open(tmp_path / "pwned", "w")], dtype=object)
    with pytest.raises(UnsafeResultError):
        through_data(array)


Point = collections.namedtuple("Point", "x y")


class DictSubclass(dict):  # type: ignore[type-arg]
    """Pickled at protocol 0 through ``copyreg._reconstructor``."""


def test_namedtuple_of_the_requester_travels_as_data() -> None:
    assert codec.dumps_result(Point(1, 2))[0] == codec.DATA
    got = through_data(Point(1, 2))
    assert got == Point(1, 2) and type(got) is Point


class _RawNdarray:
    """``numpy.ndarray((1,), object, buffer)``: an object array whose pointers are bytes
    the sender chose; reading it would dereference them (memory corruption)."""

    def __reduce__(self):
        return (np.ndarray, ((1,), np.dtype("O"), bytearray(b"AAAAAAAA")))


class _ObjectReconstruct:
    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct

        return (_reconstruct, (np.ndarray, (1,), np.dtype("O")))


class _HugeBytes:
    def __reduce__(self):
        return (bytes, (2**35,))


class _HugeList:
    def __reduce__(self):
        return (list, (range(10**12),))


#: The pickles the old allow-list unpickler had to special-case, and the ones that
#: walked around it: an untrusted requester now refuses every pickle before reading it.
OLD_ATTACKS = {
    "copyreg reconstructor": pickle.dumps(Reducer(copyreg._reconstructor, DictSubclass, dict, {"a": 1}), 5),
    "protocol 0 names": pickle.dumps(DictSubclass(a=1), protocol=0),
    "ndarray call": pickle.dumps(_RawNdarray(), protocol=5),
    "object dtype": pickle.dumps(_ObjectReconstruct(), protocol=5),
    "huge bytes": pickle.dumps(_HugeBytes(), protocol=5),
    "huge list": pickle.dumps(_HugeList(), protocol=5),
    # GLOBAL fractions Fraction; (None, {"__hash__": None}); BUILD; STOP
    "class rewrite": b"\x80\x05cfractions\nFraction\nN}X\x08\x00\x00\x00__hash__Ns\x86b.",
}


@pytest.mark.parametrize("name", list(OLD_ATTACKS))
@pytest.mark.parametrize("flag", [codec.PICKLE, codec.DILL])
def test_no_pickle_is_read_from_an_untrusted_peer(name: str, flag: bytes) -> None:
    original = fractions.Fraction.__dict__["__hash__"]
    for buffers in ([flag, OLD_ATTACKS[name]], [codec.CODE, b"dict", flag, OLD_ATTACKS[name]]):
        with pytest.raises(UnsafeResultError):
            codec.loads_data(buffers, trusted=False)
    assert fractions.Fraction.__dict__["__hash__"] is original
    assert hash(fractions.Fraction(1, 3)) == hash(fractions.Fraction(2, 6))


@pytest.mark.parametrize(
    "buffers",
    [
        [],
        [codec.PICKLE],
        [b"\x07", b"x"],
        [codec.DATA, b"\xc1"],
        [codec.DATA, b"\x92\x01"],
        [codec.CODE, b"x", b"\x07", b"y"],
        [codec.CODE, b"x"],
    ],
)
def test_malformed_encodings_raise_protocol_error(buffers: list[bytes]) -> None:
    with pytest.raises(ProtocolError):
        codec.loads_data(buffers, trusted=True)


@given(st.binary(max_size=300))
def test_untrusted_decoder_on_random_bytes_fails_cleanly(stream: bytes) -> None:
    try:
        codec.loads_data([codec.DATA, stream], trusted=False)
    except ProtocolError:
        pass


def test_format_exception_is_plain_text() -> None:
    try:
        {}["missing"]
    except KeyError as exc:
        info = codec.format_exception(exc)
    assert info["type"] == "KeyError"
    assert info["message"] == "'missing'"
    assert "test_format_exception_is_plain_text" in info["traceback"]
    assert all(isinstance(v, str) for v in info.values())


def test_format_exception_names_non_builtin_types_and_clips() -> None:
    info = codec.format_exception(UnsafeResultError("x" * 100_000))
    assert info["type"] == "peer.errors.UnsafeResultError"
    assert len(info["message"]) < 10_000
    assert len(wire.encode_json(info)) < wire.JSON_LIMIT


@pytest.mark.parametrize(
    "arr",
    [
        np.arange(10),
        np.zeros((3, 4), dtype=np.float32),
        np.asfortranarray(np.arange(6).reshape(2, 3)),
        np.array(["a", "bb"]),
        np.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f8")]),
        np.arange(1 << 14),
    ],
)
def test_ordinary_arrays_decode_in_band_and_out_of_band(arr) -> None:
    for buffers, trusted in ((codec.dumps_result(arr), False), (codec.dumps_data(arr), True)):
        out = codec.loads_data(buffers, trusted=trusted)
        assert out.dtype == arr.dtype and np.array_equal(out, arr)
