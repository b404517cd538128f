"""The data format for results: every listed type round trips exactly, code and
unknown classes cannot be expressed, and hostile frames fail cleanly within bounds."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import fractions
import math
import pathlib
import signal
import sys
import time
import tracemalloc
import types
import uuid
from collections import OrderedDict, deque
from typing import Any, NamedTuple

import msgpack
import numpy as np
import pytest

from peer import datacodec, wire
from peer.datacodec import Unrepresentable
from peer.errors import DataError, RemoteTraceback


@dataclasses.dataclass
class Point:
    x: int
    y: float = 0.0
    tags: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Frozen:
    name: str
    when: datetime.date


@dataclasses.dataclass
class Derived:
    a: int
    total: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.total = self.a * 2


@dataclasses.dataclass
class WithInitVar:
    a: int
    scale: dataclasses.InitVar[int] = 1


class Pair(NamedTuple):
    left: Any
    right: Any


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Perm(enum.Flag):
    R = 4
    W = 2
    X = 1


class Outer:
    @dataclasses.dataclass
    class Inner:
        v: int


def make_point(x: int = 0) -> Point:
    """A function, not a class: a result must not be able to call it."""
    return Point(x)


Alias = Point  # the same class under another name: a name must resolve to itself


def through(value: Any, *, trusted: bool = False) -> Any:
    """Encode, flatten into one received payload as the wire does, and decode."""
    payload = bytearray(b"".join(bytes(p) for p in wire.pack_buffers(datacodec.dumps(value))))
    return datacodec.loads(wire.unpack_buffers(payload), trusted=trusted)


UTC2 = datetime.timezone(datetime.timedelta(hours=2))
VALUES = [
    None,
    True,
    False,
    0,
    -1,
    2**63,
    -(2**64),
    2**100,
    -(10**4299),
    1.5,
    -0.0,
    math.inf,
    2 - 3j,
    "",
    "text é ✓ 𝄞",
    b"",
    b"\x00bytes",
    bytearray(b"ba"),
    bytearray(200_000),
    [],
    [1, [2, (3,)]],
    (),
    (1, "a", (None,)),
    {},
    {"a": {1, 2}, "b": frozenset({3})},
    {1: "int key", (1, 2): "tuple key", frozenset({1}): "frozenset key", None: 0, 2.5: 1, b"k": 2},
    set(),
    frozenset(),
    {(1, 2), (3, 4)},
    [bytearray(b"in a list"), {"k": (bytearray(b"in a tuple"),)}],
    datetime.date(2024, 5, 1),
    datetime.time(1, 2, 3, 4),
    datetime.time(23, 59, tzinfo=UTC2),
    datetime.datetime(2024, 5, 1, 12, 30, 1, 999, tzinfo=UTC2),
    datetime.datetime(2024, 5, 1, 12, 30, tzinfo=datetime.timezone(datetime.timedelta(hours=-5), "EST")),
    datetime.datetime(2024, 11, 3, 1, 30, fold=1),
    datetime.datetime.min,
    datetime.datetime.max.replace(tzinfo=datetime.UTC),
    datetime.timedelta(days=-1, seconds=3, microseconds=7),
    datetime.timedelta.max,
    decimal.Decimal("1.10"),
    decimal.Decimal("-0"),
    decimal.Decimal("1E+4000"),
    decimal.Decimal("Infinity"),
    fractions.Fraction(1, 3),
    fractions.Fraction(-(10**1000), 7),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    pathlib.Path("/srv/data/out.csv"),
    pathlib.PurePosixPath("a/b"),
    pathlib.PureWindowsPath(r"C:\Users\x"),
    Point(1, 2.5, ["a"]),
    Frozen("f", datetime.date(2020, 1, 1)),
    Derived(4),
    Outer.Inner(3),
    Pair(1, Pair("nested", [Point(2)])),
    Color.BLUE,
    Level.HIGH,
    Perm.R | Perm.X,
    {Color.RED: Level.LOW, Frozen("k", datetime.date(2021, 1, 1)): Pair(1, 2)},
]


@pytest.mark.parametrize("value", VALUES, ids=lambda v: type(v).__name__)
def test_every_listed_type_round_trips_exactly(value: Any) -> None:
    got = through(value)
    assert got == value
    assert type(got) is type(value)
    if isinstance(value, dict):
        assert [type(k) for k in got] == [type(k) for k in value]
    if isinstance(value, datetime.datetime | datetime.time) and value.tzinfo is not None:
        assert got.tzname() == value.tzname()


def test_nan_and_decimal_nan_round_trip() -> None:
    assert math.isnan(through(math.nan))
    assert through(decimal.Decimal("NaN")).is_nan()
    assert through(decimal.Decimal("sNaN")).is_snan()


def test_concrete_path_comes_back_as_path() -> None:
    """The choice documented in `datacodec`: a concrete path of our flavour decodes as
    `pathlib.Path` (building one touches no file); pure paths stay pure."""
    assert type(through(pathlib.Path("x"))) is type(pathlib.Path("x"))
    assert type(through(pathlib.PurePosixPath("x"))) is pathlib.PurePosixPath


def test_builtin_exception_round_trips_with_its_args_and_traceback() -> None:
    try:
        raise ValueError("bad value", 3)
    except ValueError as exc:
        sent = exc
    got = through(sent)
    assert type(got) is ValueError and got.args == ("bad value", 3)
    assert isinstance(got.__cause__, RemoteTraceback)
    assert "test_builtin_exception_round_trips" in got.__cause__.text
    with pytest.raises(ValueError, match="bad value"):
        raise got


def test_exception_with_args_that_are_not_data_keeps_its_message() -> None:
    got = through(KeyError(object()))
    assert type(got) is KeyError and got.args[0].startswith("<object object")


def test_oserror_keeps_errno_and_subclass() -> None:
    got = through(FileNotFoundError(2, "No such file", "/x"))
    assert type(got) is FileNotFoundError and got.errno == 2 and got.filename == "/x"


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float64).reshape(3, 4),
        np.asfortranarray(np.arange(12, dtype=np.int32).reshape(3, 4)),
        np.arange(20)[::3],  # not contiguous: sent as a contiguous copy
        np.zeros((0, 3)),
        np.array(5.0),
        np.array([(1.0, 2)], dtype=[("a", "<f8"), ("b", "<i2")]),
        np.zeros(3, dtype=[("p", [("x", "<f4"), ("y", "<f4")]), ("m", "<i4", (2, 2))]),
        np.array(["ab", "c"]),
        np.array([b"ab", b"c"]),
        np.array([np.datetime64("2024-01-01"), np.datetime64("NaT")]),
        np.array([np.timedelta64(5, "s")]),
        np.array([1 + 2j], dtype=np.complex64),
        np.array([True, False]),
        np.arange(1 << 15, dtype=np.float64).reshape(-1, 8),  # out of band
        np.asfortranarray(np.ones((300, 300), dtype=">i4")),  # out of band, F order, big-endian
    ],
    ids=lambda a: f"{a.dtype}-{a.shape}",
)
def test_numpy_arrays_round_trip(array: np.ndarray) -> None:
    got = through(array)
    assert type(got) is np.ndarray and got.dtype == array.dtype and got.shape == array.shape
    np.testing.assert_array_equal(got, array)
    assert got.flags.writeable
    if array.flags.f_contiguous and not array.flags.c_contiguous:
        assert got.flags.f_contiguous


@pytest.mark.parametrize(
    "scalar",
    [np.float64(2.5), np.int8(-3), np.uint64(2**64 - 1), np.bool_(True), np.complex128(1j),
     np.datetime64("2024-01-01T12:00"), np.str_("s"), np.bytes_(b"b"), np.void(b"\x01\x02")],
    ids=lambda s: type(s).__name__,
)  # fmt: skip
def test_numpy_scalars_round_trip(scalar: Any) -> None:
    got = through(scalar)
    assert type(got) is type(scalar) and got == scalar


def test_big_arrays_travel_out_of_band_and_decode_on_the_received_frame() -> None:
    array = np.arange(1 << 17, dtype=np.float64)
    frame, *oob = datacodec.dumps(array)
    assert len(frame) < 200 and len(oob) == 1
    assert np.shares_memory(np.frombuffer(oob[0], dtype=np.float64), array)  # sender: no copy
    payload = bytearray(b"".join(bytes(p) for p in wire.pack_buffers([frame, *oob])))
    got = datacodec.loads(wire.unpack_buffers(payload))
    np.testing.assert_array_equal(got, array)
    assert np.shares_memory(got, np.frombuffer(payload, dtype=np.uint8))  # receiver: no copy


@pytest.mark.parametrize(
    "value",
    [
        object(),
        lambda: 1,
        [1, {"deep": print}],
        OrderedDict(a=1),
        deque([1]),
        range(3),
        memoryview(b"x"),
        [memoryview(b"x")],
        msgpack.ExtType(1, b""),
        np.array([1, "x"], dtype=object),
        np.ma.masked_array([1, 2]),
        2**14300,
        fractions.Fraction(1, 2**14300),
        decimal.Decimal("1e999999999"),
        WithInitVar(1),
        type("Sub", (list,), {})(),
        datetime.datetime(
            2024, 1, 1, tzinfo=type("NoOffset", (datetime.tzinfo,), {"utcoffset": lambda s, d: None})()
        ),
    ],
    ids=lambda v: type(v).__name__,
)
def test_what_is_not_data_is_refused_by_the_encoder_naming_the_type(value: Any) -> None:
    with pytest.raises(Unrepresentable) as caught:
        datacodec.dumps(value)
    assert caught.value.type_name


def test_self_referencing_list_is_refused_not_looped_on() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(Unrepresentable, match="nested"):
        datacodec.dumps(loop)
    loop2: list[Any] = [bytearray(b"x")]
    loop2.append(loop2)
    with pytest.raises(Unrepresentable, match="nested"):
        datacodec.dumps(loop2)


# --- hostile frames ---------------------------------------------------------------


def ext(code: int, data: bytes = b"") -> msgpack.ExtType:
    return msgpack.ExtType(code, data)


def named(code: int, name: str) -> msgpack.ExtType:
    return ext(code, name.encode())


def array_ext(dtype: str, shape: tuple[int, ...], body: bytes, flags: int = 0) -> msgpack.ExtType:
    head = datacodec._ARRAY_HEAD.pack(flags, len(shape), len(dtype)) + dtype.encode()
    return ext(datacodec._NDARRAY, head + b"".join(d.to_bytes(8, "big") for d in shape) + body)


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


ME = __name__
HOSTILE: dict[str, list[bytes]] = {
    "str declaring 4 GiB": [b"\xdb\xff\xff\xff\xff" + b"x" * 10],
    "bin declaring 4 GiB": [b"\xc6\xff\xff\xff\xff" + b"x" * 10],
    "array declaring 4 G items": [b"\xdd\xff\xff\xff\xff\xc0"],
    "map declaring 4 G pairs": [b"\xdf\xff\xff\xff\xff\xc0\xc0"],
    "ext declaring 4 GiB": [b"\xc9\xff\xff\xff\xff\x10"],
    "nested arrays each declaring 1 M items": [b"\xdd\x00\x10\x00\x00" * 2000],
    "nesting 5,000 deep": [b"\x91" * 5000 + b"\xc0"],
    "trailing bytes": [b"\xc0\xc0"],
    "empty frame": [b""],
    "no frame": [],
    "bigint over 4,300 digits": [pack(ext(datacodec._BIGINT, b"\x7f" * 5000))],
    "empty bigint": [pack(ext(datacodec._BIGINT))],
    "Fraction with huge numerator": [pack(ext(datacodec._FRACTION, b"\x13\x88" + b"\x7f" * 5000 + b"\x01"))],
    "Fraction over zero": [pack(ext(datacodec._FRACTION, b"\x00\x01\x01\x00"))],
    "Decimal 1e999999999": [pack(ext(datacodec._DECIMAL, b"1e999999999"))],
    "Decimal exponent 10**6": [pack(ext(datacodec._DECIMAL, b"1E-100000"))],
    "Decimal of 9,000 digits": [pack(ext(datacodec._DECIMAL, b"9" * 9000))],
    "Decimal that is not a number": [pack(ext(datacodec._DECIMAL, b"__import__('os')"))],
    "date out of range": [pack(ext(datacodec._DATE, b"\x00\x00\x0d\x20"))],
    "timedelta over max": [pack(ext(datacodec._TIMEDELTA, b"\x7f\xff\xff\xff" + b"\x00" * 8))],
    "UTC offset of 2 days": [
        pack(
            ext(datacodec._TIME, b"\x01\x02\x03\x00\x00\x00\x00\x00" + (2 * 86400 * 10**6).to_bytes(8, "big"))
        )
    ],
    "UUID of 3 bytes": [pack(ext(datacodec._UUID, b"abc"))],
    "unknown extension": [pack(ext(99, b"x"))],
    "msgpack's own negative extension": [b"\xd4\xfbx"],
    "numpy object dtype": [pack(array_ext("|O", (1,), b"A" * 8))],
    "numpy structured dtype holding an object": [pack(array_ext("i4,O", (1,), b"A" * 12))],
    "numpy StringDType (pointers)": [pack(array_ext("T", (1,), b"A" * 16))],
    "numpy void scalar of 2 GiB": [pack(array_ext("|V2147483648", (), b"x" * 8, datacodec._IS_SCALAR))],
    "numpy shape beyond its bytes": [pack(array_ext("<f8", (1 << 40,), b"\x00" * 8))],
    "numpy itemsize zero": [pack(array_ext("|S0", (1 << 40,), b""))],
    "numpy 100 dims": [pack(array_ext("<f8", (1,) * 100, b"\x00" * 8))],
    "numpy dtype that is not one": [pack(array_ext("os.system", (1,), b"\x00" * 8))],
    "out-of-band buffer used twice": [
        pack([ext(datacodec._BYTEARRAY_OOB, b"\x00\x00\x00\x00")] * 2),
        b"x" * 100_000,
    ],
    "out-of-band buffer missing": [pack(ext(datacodec._BYTEARRAY_OOB, b"\x00\x00\x00\x05"))],
    "out-of-band buffer unused": [pack(None), b"x" * 10],
    "marker smuggled into a list's tail": [pack([1, ext(datacodec._TUPLE)])],
    "marker as the whole result": [pack(ext(datacodec._TUPLE))],
    "marker as a dict key": [b"\x81" + pack(ext(datacodec._SET)) + b"\xc0"],
    "two markers in one list": [pack([ext(datacodec._TUPLE), ext(datacodec._TUPLE)])],
    "container marker with a payload": [pack([ext(datacodec._TUPLE, b"x"), 1])],
    "unhashable dict key": [b"\x81" + pack([1]) + b"\xc0"],
    "set holding a list": [pack([ext(datacodec._SET), [1]])],
    "20,000 dict keys with one hash": [
        b"\xdf"
        + (20_000).to_bytes(4, "big")
        + b"".join(
            pack(ext(datacodec._BIGINT, (k * (2**61 - 1)).to_bytes(16, "big", signed=True))) + b"\xc0"
            for k in range(1, 20_001)
        )
    ],
    "20,000 set items with one hash": [
        pack(
            [ext(datacodec._SET)]
            + [
                ext(datacodec._BIGINT, (k * (2**61 - 1)).to_bytes(16, "big", signed=True))
                for k in range(1, 20_001)
            ]
        )
    ],
    "repeated dict keys": [b"\xde\x00\x40" + b"\x01\xc0" * 64],
    "class of a module never imported": [pack([named(datacodec._DATACLASS, "xml.dom.minidom:Node"), {}])],
    "class name that is a function": [pack([named(datacodec._DATACLASS, f"{ME}:make_point"), {"x": 1}])],
    "class name that is an alias": [pack([named(datacodec._DATACLASS, f"{ME}:Alias"), {"x": 1}])],
    "class that is not a dataclass": [pack([named(datacodec._DATACLASS, f"{ME}:Color"), {"x": 1}])],
    "Enum marker on a dataclass": [pack([named(datacodec._ENUM, f"{ME}:Point"), 1])],
    "NamedTuple marker on a plain tuple class": [pack([named(datacodec._NAMEDTUPLE, "builtins:tuple"), 1])],
    "dataclass of the standard library": [pack([named(datacodec._DATACLASS, "pstats:FunctionProfile"), {}])],
    "Enum of the standard library": [pack([named(datacodec._ENUM, "signal:Signals"), 2])],
    "dataclass with unknown fields": [pack([named(datacodec._DATACLASS, f"{ME}:Point"), {"evil": 1}])],
    "dataclass fields that are not a dict": [pack([named(datacodec._DATACLASS, f"{ME}:Point"), [1]])],
    "Flag bits it does not have": [pack([named(datacodec._ENUM, f"{ME}:Perm"), 1 << 40])],
    "Enum value it does not have": [pack([named(datacodec._ENUM, f"{ME}:Color"), "green"])],
    "exception that is not builtin": [pack([named(datacodec._EXCEPTION, "os:system"), ["true"], None])],
    "exception through a dotted name": [pack([named(datacodec._EXCEPTION, "builtins.ValueError"), [], None])],
    "class name of 10 kB": [pack([named(datacodec._DATACLASS, "m:" + "x" * 10_000), {}])],
    "invalid UTF-8": [b"\xa2\xff\xfe"],
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_frames_fail_cleanly_fast_and_small(name: str) -> None:
    buffers = HOSTILE[name]
    size = sum(len(b) for b in buffers)
    modules = set(sys.modules)
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(DataError):
            datacodec.loads(buffers)
        elapsed = time.monotonic() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 2.0
    assert peak <= datacodec.MEMORY_FACTOR * size + (1 << 20)
    assert set(sys.modules) == modules  # nothing was imported


BUILT: list[Any] = []


@dataclasses.dataclass
class Recorder:
    field: Any

    def __post_init__(self) -> None:
        BUILT.append(self.field)


def test_a_class_is_never_called_with_a_smuggled_marker_inside_its_fields() -> None:
    for field in (
        [1, ext(datacodec._TUPLE)],
        {"k": [2, [3, ext(datacodec._SET)]]},
        ext(datacodec._FROZENSET),
    ):
        with pytest.raises(DataError, match="marker"):
            datacodec.loads([pack([named(datacodec._DATACLASS, f"{ME}:Recorder"), {"field": field}])])
    assert BUILT == []
    assert datacodec.loads([pack([named(datacodec._DATACLASS, f"{ME}:Recorder"), {"field": 1}])]) == Recorder(
        1
    )


def test_library_classes_decode_when_trusted() -> None:
    frame = pack([named(datacodec._ENUM, "signal:Signals"), 2])
    assert datacodec.loads([frame], trusted=True) is signal.Signals(2)


def test_class_lookup_never_calls_a_module_getattr() -> None:
    calls = []
    module = types.ModuleType("lazy_module_for_test")
    module.__getattr__ = lambda name: calls.append(name) or Point  # type: ignore[attr-defined]
    module.__file__ = __file__
    sys.modules[module.__name__] = module
    try:
        with pytest.raises(DataError, match="not a class this process has loaded"):
            datacodec.loads([pack([named(datacodec._DATACLASS, "lazy_module_for_test:Point"), {"x": 1}])])
    finally:
        del sys.modules[module.__name__]
    assert calls == []


def test_msgpack_timestamps_decode_as_floats_not_msgpack_objects() -> None:
    assert datacodec.loads([pack(msgpack.Timestamp(1, 0))]) == 1.0


def test_results_are_bounded_in_memory_relative_to_their_frame() -> None:
    """Worst cases per byte: empty dicts and lists, fixints in sets, short strings."""
    for value in ([{}] * 50_000, [[]] * 50_000, [()] * 30_000, set(range(40_000)), ["ab"] * 40_000):
        frame, *oob = datacodec.dumps(value)
        tracemalloc.start()
        try:
            got = datacodec.loads([frame, *oob])
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert got == value
        assert peak <= datacodec.MEMORY_FACTOR * len(frame) + 4096, (
            type(value[0]) if isinstance(value, list) else set,
            peak,
            len(frame),
        )


# --- errors raised by tasks -------------------------------------------------------


def raised(exc: BaseException) -> dict[str, Any]:
    """The ERROR message the sandbox sends for ``exc`` raised in a task."""
    from peer import codec

    try:
        raise exc
    except BaseException as caught:
        return codec.format_exception(caught)


def test_builtin_task_errors_are_their_own_type_and_task_errors() -> None:
    from peer.errors import TaskError

    error = datacodec.task_error(raised(KeyError("missing")))
    assert isinstance(error, KeyError) and isinstance(error, TaskError)
    assert error.args == ("missing",) and error.type_name == "KeyError"
    assert isinstance(error.__cause__, RemoteTraceback) and "in raised" in error.__cause__.text
    assert str(error) == "KeyError: 'missing'"  # the traceback is printed once, as the cause
    with pytest.raises(KeyError):
        raise error


class OwnError(LookupError):
    """An exception class of the requester's own code."""

    def __init__(self, key: str, tries: int) -> None:
        super().__init__(key, tries)
        self.key = key


def test_the_requesters_own_exception_classes_come_back_as_themselves() -> None:
    from peer.errors import TaskError

    error = datacodec.task_error(raised(OwnError("k", 3)))
    assert isinstance(error, OwnError) and isinstance(error, TaskError)
    assert error.args == ("k", 3) and error.key == "k"
    assert error.type_name == f"{ME}.OwnError"


@pytest.mark.parametrize(
    "type_name",
    ["json.decoder.JSONDecodeError", f"{ME}.Point", f"{ME}.make_point", f"{ME}.Nope", "no.such.module.Error"],
)
def test_library_and_non_exception_names_stay_plain_task_errors(type_name: str) -> None:
    from peer.errors import TaskError

    assert type(datacodec.task_error({"type": type_name, "message": "m"})) is TaskError


def test_oserror_from_a_task_keeps_errno_and_filename() -> None:
    error = datacodec.task_error(raised(FileNotFoundError(2, "No such file", "/nowhere")))
    assert isinstance(error, FileNotFoundError) and error.errno == 2 and error.filename == "/nowhere"


def test_task_error_args_that_are_not_data_fall_back_to_the_message() -> None:
    error = datacodec.task_error(raised(ValueError(object())))
    assert isinstance(error, ValueError) and error.args[0].startswith("<object object")


def test_task_errors_survive_pickling() -> None:
    import pickle

    error = pickle.loads(pickle.dumps(datacodec.task_error(raised(ValueError("v", 1)))))
    assert isinstance(error, ValueError) and error.args == ("v", 1)


@pytest.mark.parametrize(
    "info",
    [
        {"type": "SystemExit", "message": "0"},
        {"type": "KeyboardInterrupt", "message": ""},
        {"type": "StopIteration", "message": ""},
        {"type": "ExceptionGroup", "message": "g"},
        {"type": "os.system", "message": "x"},
        {"type": "peer.errors.TaskError", "message": "x"},
        {"type": "__import__", "message": "os"},
        {"type": "SandboxDied", "message": "SIGSEGV"},
    ],
    ids=lambda info: info["type"],
)
def test_other_task_errors_stay_plain_task_errors(info: dict[str, str]) -> None:
    from peer.errors import TaskError

    assert type(datacodec.task_error(info)) is TaskError


@pytest.mark.parametrize(
    "args",
    [
        "not base64!",
        "",
        "AAAA",
        __import__("base64").b64encode(b"\xdd\xff\xff\xff\xff").decode(),  # a list declaring 4 G items
        __import__("base64").b64encode(pack({"not": "a list"})).decode(),
        __import__("base64").b64encode(pack([named(datacodec._DATACLASS, "os:system")])).decode(),
        "A" * 100_000,
        12,
    ],
)
def test_hostile_error_args_fall_back_to_the_message(args: Any) -> None:
    error = datacodec.task_error({"type": "ValueError", "message": "plain", "args": args})
    assert isinstance(error, ValueError) and error.args == ("plain",)
