"""Results as data: a typed msgpack format that can carry values but never code.

A peer's result is decoded on the requester, so its bytes are hostile. This format can
only express None, bool, int, float, complex, str, bytes, bytearray, list, tuple, dict,
set, frozenset, date, time, datetime (with a fixed UTC offset), timedelta, Decimal,
Fraction, UUID, pure and concrete paths, numpy arrays and scalars of plain dtypes,
builtin exceptions, and instances of the requester's own dataclasses, NamedTuples and
Enums. Nothing in it names a function to call: a class is found by module and qualified
name in modules the requester has *already imported* (never imported here), and only
when it really is a dataclass, NamedTuple or Enum (or a builtin exception) of that very
name; it is then called with the fields, as the requester's own code would.

Layout: ``dumps`` returns ``[frame, *out_of_band]``. The frame is one msgpack object;
msgpack's own types carry None, bool, 64-bit ints, floats, str, bytes, lists and dicts;
extension types carry the other leaves; tuples, sets, frozensets and class instances are
lists whose first item is a *marker* extension (so their children stay plain msgpack,
never nested inside an extension's bytes). Large numpy arrays and bytearrays travel as
out-of-band buffers, which on the requester are slices of the received frame: arrays
are built on top of them without a copy.

Bounds the decoder holds (why: a few hostile bytes must not cost the requester much):

- The frame is walked once with msgpack's non-allocating ``skip`` before it is built, so
  every declared length is backed by bytes that arrived (msgpack preallocates a list for
  a declared array length; without this, nested headers claiming millions of items
  would allocate gigabytes from a few kilobytes).
- Nesting is bounded by msgpack's fixed parser stack (1,024 levels; the encoder stops
  at 511); ints by `MAX_INT_BYTES` (4,300 decimal digits, Python's own str limit),
  also for Fraction parts; Decimal digits and exponents by `MAX_DECIMAL_DIGITS`;
  numpy ``shape * itemsize`` must equal the bytes given; every out-of-band buffer is
  used exactly once.
- Dicts and sets of more than a few items are refused when their keys' hashes collide
  beyond a handful (int, tuple, Fraction or UUID hashes can be chosen by a peer, and a
  dict of colliding keys takes quadratic time to build).
- The decoded value is at most ~`MEMORY_FACTOR` times its frame in memory (the worst
  case is a frame of empty dicts: 1 byte each on the wire, ~64 in Python).
"""

from __future__ import annotations

import base64
import builtins
import dataclasses
import datetime
import decimal
import enum
import fractions
import itertools
import os
import pathlib
import re
import struct
import sys
import sysconfig
import traceback
import uuid
from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Any

import msgpack

from peer.errors import ERROR_ARGS_LIMIT, DataError, RemoteTraceback, TaskError, remote_error

Buffer = bytes | bytearray | memoryview

#: Python's own limit for int <-> str conversion (sys.int_info.default_max_str_digits).
MAX_INT_DIGITS = 4300
#: Bytes of the largest int we carry (its two's complement), checked with `_INT_LIMIT`.
MAX_INT_BYTES = 1787
_INT_LIMIT = 10**MAX_INT_DIGITS
#: Decimal coefficient digits and |exponent|: int(Decimal("1e999999999")) would hang.
MAX_DECIMAL_DIGITS = 4300
#: Arrays and bytearrays at least this big travel out of band (zero-copy on both sides).
OUT_OF_BAND = 64 * 1024
#: Documented bound on decoded size / frame size (tests hold the decoder to it).
MEMORY_FACTOR = 128
#: Keys of a dict (items of a set) whose hashes may repeat before it is refused.
HASH_REPEATS = 16
_SMALL = 32  # containers this small cannot take long to build, whatever their hashes
#: Frames this small skip the length walk: msgpack preallocates at most 8 bytes per
#: declared item, items <= frame size, depth <= frame size: 8 * 256 * 256 = 512 KiB.
_UNCHECKED = 256
_NAME_LIMIT = 1024
_TRACEBACK_LIMIT = 32 * 1024
_MAX_DIMS = 64  # numpy's own NPY_MAXDIMS
_MAX_DIM = 1 << 48

# Marker extensions: the first item of a list that stands for something else.
_TUPLE, _SET, _FROZENSET, _DATACLASS, _NAMEDTUPLE, _ENUM, _EXCEPTION = range(1, 8)
# Leaf extensions.
_BIGINT, _COMPLEX, _BYTEARRAY, _BYTEARRAY_OOB, _DATE, _TIME, _DATETIME, _TIMEDELTA = range(16, 24)
_DECIMAL, _FRACTION, _UUID, _PATH, _NDARRAY = range(24, 29)

_PLAIN = frozenset({type(None), bool, int, float, str, bytes})
#: What msgpack packs natively but this format must not take as bytes (or at all).
_RAW = frozenset({bytearray, memoryview, msgpack.ExtType, msgpack.Timestamp})
_DEPTH = 511  # msgpack's Packer recursion limit

_DATE_S = struct.Struct("!HBB")
_CLOCK = struct.Struct("!BBBIB")  # hour, minute, second, microsecond, fold
_TZ = struct.Struct("!q")  # UTC offset in microseconds
_TIMEDELTA_S = struct.Struct("!iiI")
_COMPLEX_S = struct.Struct("!dd")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_ARRAY_HEAD = struct.Struct("!BBH")  # flags, ndim, dtype length
_F_ORDER, _IS_OOB, _IS_SCALAR, _STRUCTURED = 1, 2, 4, 8

_PATH_CLASSES: tuple[type[pathlib.PurePath], ...] = (
    pathlib.PurePosixPath,
    pathlib.PureWindowsPath,
    pathlib.PosixPath,
    pathlib.WindowsPath,
)
_DECIMAL_TEXT = re.compile(r"[+-]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:E[+-]?\d{1,6})?|Infinity|s?NaN\d*)\Z", re.I)
_BUILTIN_EXCEPTIONS: dict[str, type[BaseException]] = {
    name: obj
    for name, obj in vars(builtins).items()
    if isinstance(obj, type) and issubclass(obj, BaseException)
}
_LIBRARY_ROOTS = tuple(
    os.path.realpath(p) + os.sep
    for key in ("stdlib", "platstdlib", "purelib", "platlib")
    if (p := sysconfig.get_paths().get(key))
)
_LIBRARY_PACKAGES = frozenset({"peer", "dill", "numpy", "msgpack"})


class Unrepresentable(TypeError):
    """A value holds something this format cannot carry (the encoder's error).

    Attributes:
        type_name: The qualified name of the first such type met, for the message a
            requester sees when the result then travels pickled.
    """

    def __init__(self, type_name: str, why: str = "") -> None:
        super().__init__(f"{type_name} cannot travel as data{': ' + why if why else ''}")
        self.type_name = type_name


def type_name(cls: type) -> str:
    """``module.qualname``, or the bare name for builtins."""
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


# -- encoding (runs in the sandbox child) ---------------------------------------------


def dumps(obj: Any) -> list[Buffer]:
    """Encode ``obj`` as ``[frame, *out_of_band_buffers]``.

    The out-of-band buffers are views of the objects' own memory (numpy arrays,
    bytearrays), so sending them with `wire.write_frame` copies nothing.

    Raises:
        Unrepresentable: ``obj`` holds a type outside the format, an int over
            `MAX_INT_DIGITS`, or nests deeper than 511 levels.
    """
    encoder = _IDLE.pop() if _IDLE else _Encoder()
    frame = b""
    try:
        if _holds_raw(obj):
            obj = encoder.convert(obj, _DEPTH)
        frame = encoder.packer.pack(obj)
        return [frame, *encoder.oob]
    except Unrepresentable:
        encoder.packer.reset()
        raise
    except (ValueError, RecursionError, OverflowError) as exc:  # msgpack: "recursion limit exceeded", > 4 GiB
        encoder.packer.reset()
        why = "nested too deeply" if isinstance(exc, RecursionError) or "recursion" in str(exc) else str(exc)
        raise Unrepresentable(type_name(type(obj)), why) from None
    finally:
        encoder.oob = []
        if len(frame) <= _KEEP:  # a Packer keeps its buffer at the largest size it packed
            _IDLE.append(encoder)


def _holds_raw(obj: Any) -> bool:
    """Whether a bytearray, memoryview or msgpack object is reachable from ``obj``.

    msgpack packs those natively (a bytearray as bytes), past our ``default`` hook,
    so they must be found first. ``set(map(type, ...))`` keeps the common case (flat
    containers of plain values) at C speed.
    """
    stack: list[tuple[Any, int]] = [(obj, 0)]
    while stack:
        value, depth = stack.pop()
        cls = type(value)
        if cls in _PLAIN:
            continue
        if cls in _RAW:
            return True
        if depth > _DEPTH:
            raise Unrepresentable(type_name(cls), f"nested deeper than {_DEPTH} levels")
        children: Any
        if cls is list or cls is tuple or cls is set or cls is frozenset:
            children = value
        elif cls is dict:
            children = [*value.keys(), *value.values()]
        else:
            children = _children(value)
        kinds = set(map(type, children))
        if kinds <= _PLAIN:
            continue
        if kinds & _RAW:
            return True
        stack.extend((child, depth + 1) for child in children if type(child) not in _PLAIN)
    return False


def _children(value: Any) -> Sequence[Any]:
    """The values inside a non-container leaf-or-record, for `_holds_raw`."""
    if isinstance(value, BaseException):
        return value.args
    if isinstance(value, enum.Enum):
        return (value.value,)
    if isinstance(value, tuple):  # NamedTuple
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [getattr(value, f.name) for f in dataclasses.fields(value)]
    return ()


class _Encoder:
    """A Packer whose ``default`` maps our types onto msgpack, and the out-of-band
    buffers of the encoding in progress. Encoders are reused (`_IDLE`): the Packer and
    its bound ``default`` form a cycle, and a fresh one per result would leave a
    megabyte buffer per call for the garbage collector."""

    def __init__(self) -> None:
        self.oob: list[Buffer] = []
        self.packer = msgpack.Packer(
            default=self.default, strict_types=True, use_bin_type=True, datetime=False, autoreset=True
        )

    def convert(self, obj: Any, depth: int) -> Any:
        """Rebuild ``obj`` as msgpack-native values (the slow path, for bytearrays)."""
        if depth < 0:
            raise Unrepresentable(type_name(type(obj)), f"nested deeper than {_DEPTH} levels")
        cls = type(obj)
        if cls in _PLAIN:
            return obj
        if cls is list:
            return [self.convert(item, depth - 1) for item in obj]
        if cls is dict:
            if any(type(k) in _RAW for k in obj):
                raise Unrepresentable("memoryview", "as a dict key")
            return {k: self.convert(v, depth - 1) for k, v in obj.items()}  # keys hold no bytearray
        if cls is memoryview or cls is msgpack.ExtType or cls is msgpack.Timestamp:
            raise Unrepresentable(type_name(cls))
        native = self.default(obj)
        if type(native) is list:
            return [native[0], *(self.convert(item, depth - 1) for item in native[1:])]
        return native

    def default(self, obj: Any) -> Any:
        """Turn one value msgpack does not carry natively into what it does."""
        cls = type(obj)
        encode = _LEAVES.get(cls)
        if encode is not None:
            return encode(self, obj)
        if cls is tuple:
            return [_MARK[_TUPLE], *obj]
        if cls is set:
            return [_MARK[_SET], *obj]
        if cls is frozenset:
            return [_MARK[_FROZENSET], *obj]
        numpy = sys.modules.get("numpy")
        if numpy is not None and (cls is numpy.ndarray or isinstance(obj, numpy.generic)):
            return self.array(numpy, obj)
        if isinstance(obj, enum.Enum):
            return [_named(_ENUM, cls), obj.value]
        if issubclass(cls, tuple) and isinstance(getattr(cls, "_fields", None), tuple):
            return [_named(_NAMEDTUPLE, cls), *obj]
        if dataclasses.is_dataclass(cls):
            return [_named(_DATACLASS, cls), {name: getattr(obj, name) for name in _init_fields(cls)}]
        if isinstance(obj, BaseException) and _BUILTIN_EXCEPTIONS.get(cls.__name__) is cls:
            return self.exception(obj)
        raise Unrepresentable(type_name(cls))

    def exception(self, exc: BaseException) -> list[Any]:
        args = _exception_args(exc)
        try:
            dumps(args)
        except Unrepresentable:
            args = [str(exc)]  # args that are not data travel as the message
        text = "".join(traceback.format_exception(exc)) if exc.__traceback__ is not None else None
        if text is not None and len(text) > _TRACEBACK_LIMIT:
            text = "[...]\n" + text[-_TRACEBACK_LIMIT:]
        return [_named(_EXCEPTION, type(exc)), args, text]

    def array(self, numpy: Any, obj: Any) -> msgpack.ExtType:
        scalar = isinstance(obj, numpy.generic)
        arr = numpy.asarray(obj)
        dtype = arr.dtype
        if dtype.hasobject or not _plain(dtype):
            raise Unrepresentable(f"numpy array of dtype {dtype}", "Python objects are not data")
        flags = _IS_SCALAR if scalar else 0
        if dtype.fields is not None or dtype.subdtype is not None:
            flags |= _STRUCTURED
            spec = msgpack.packb(_descr(numpy.lib.format.dtype_to_descr(dtype)))
        else:
            spec = dtype.str.encode()
        if arr.flags.f_contiguous and not arr.flags.c_contiguous:
            flags |= _F_ORDER
            flat = arr.T.reshape(-1)
        else:
            flat = numpy.ascontiguousarray(arr).reshape(-1)
        data = memoryview(flat.view(numpy.uint8))
        inline = data.nbytes < OUT_OF_BAND
        if not inline:
            flags |= _IS_OOB
            self.oob.append(data)
        head = _ARRAY_HEAD.pack(flags, arr.ndim, len(spec)) + spec + struct.pack(f"!{arr.ndim}Q", *arr.shape)
        return msgpack.ExtType(_NDARRAY, head + (data.tobytes() if inline else _oob_index(self)))

    def bytearray_(self, obj: bytearray) -> msgpack.ExtType:
        if len(obj) >= OUT_OF_BAND:
            self.oob.append(memoryview(obj))
            return msgpack.ExtType(_BYTEARRAY_OOB, _oob_index(self))
        return msgpack.ExtType(_BYTEARRAY, bytes(obj))


_IDLE: list[_Encoder] = []  # list.pop/append are atomic: safe across threads
_KEEP = 1 << 20


def _exception_args(exc: BaseException) -> list[Any]:
    """What rebuilds ``exc`` by calling its type (an OSError keeps its file names)."""
    args: list[Any] = list(exc.args)
    if isinstance(exc, OSError) and exc.filename is not None and len(args) == 2:
        args += [exc.filename] + ([None, exc.filename2] if exc.filename2 is not None else [])
    return args


def error_args(exc: BaseException) -> str:
    """A raised exception's args as base64 data for the JSON ERROR message, or "" when
    they are not data or too big (the requester then rebuilds it from the message)."""
    try:
        frame, *oob = dumps(_exception_args(exc))
    except Unrepresentable:
        return ""
    text = base64.b64encode(frame).decode() if not oob else ""
    return text if len(text) <= ERROR_ARGS_LIMIT else ""


def task_error(info: dict[str, Any]) -> TaskError:
    """The exception a task raised, from its ERROR message (requester side).

    A builtin type, or an exception class of the requester's own code (found as
    `_own_class` finds dataclasses), comes back as itself too (``except KeyError:``
    works) with its args, when they arrived as valid data, and the remote traceback as
    ``__cause__``.
    """
    error = TaskError.from_dict(info)
    args: list[Any] | None = None
    if error.encoded_args:
        try:
            decoded = loads([base64.b64decode(error.encoded_args, validate=True)])
        except (DataError, ValueError):
            decoded = None
        args = decoded if type(decoded) is list else None
    base = None if error.type_name in vars(builtins) else own_exception_class(error.type_name)
    return remote_error(
        error.type_name, error.message, error.traceback_text, args, error.encoded_args, base=base
    )


def _oob_index(encoder: _Encoder) -> bytes:
    return _U32.pack(len(encoder.oob) - 1)


def _descr(descr: Any) -> Any:
    """numpy's descr (lists of tuples) as msgpack lists."""
    if isinstance(descr, list | tuple):
        return [_descr(item) for item in descr]
    return descr


_INIT_FIELDS: dict[type, tuple[str, ...]] = {}


def _init_fields(cls: type) -> tuple[str, ...]:
    """The fields a dataclass's ``__init__`` takes, cached per class."""
    names = _INIT_FIELDS.get(cls)
    if names is None:
        declared = getattr(cls, "__dataclass_fields__", {}).values()
        if any(getattr(f, "_field_type", None) is dataclasses._FIELD_INITVAR for f in declared):  # type: ignore[attr-defined]
            raise Unrepresentable(type_name(cls), "it has InitVar fields, which are not stored")
        names = tuple(f.name for f in dataclasses.fields(cls) if f.init)
        _INIT_FIELDS[cls] = names
    return names


def _named(code: int, cls: type) -> msgpack.ExtType:
    if cls.__module__ == "builtins":
        name = cls.__name__
    else:
        name = f"{cls.__module__}:{cls.__qualname__}"
    return msgpack.ExtType(code, name.encode())


def _bigint(value: int) -> bytes:
    size = (value.bit_length() + 8) // 8  # room for the sign bit
    if size > MAX_INT_BYTES or not -_INT_LIMIT < value < _INT_LIMIT:
        raise Unrepresentable("int", f"more than {MAX_INT_DIGITS} digits")
    return value.to_bytes(size, "big", signed=True)


def _encode_bigint(_: _Encoder, value: int) -> msgpack.ExtType:
    return msgpack.ExtType(_BIGINT, _bigint(value))


def _encode_fraction(_: _Encoder, value: fractions.Fraction) -> msgpack.ExtType:
    top = _bigint(value.numerator)
    return msgpack.ExtType(_FRACTION, _U16.pack(len(top)) + top + _bigint(value.denominator))


def _encode_decimal(_: _Encoder, value: decimal.Decimal) -> msgpack.ExtType:
    _sign, digits, exponent = value.as_tuple()
    if len(digits) > MAX_DECIMAL_DIGITS or (isinstance(exponent, int) and abs(exponent) > MAX_DECIMAL_DIGITS):
        raise Unrepresentable("decimal.Decimal", f"more than {MAX_DECIMAL_DIGITS} digits or exponent")
    return msgpack.ExtType(_DECIMAL, str(value).encode())


def _tz(value: datetime.datetime | datetime.time) -> bytes:
    """A fixed UTC offset (and a timezone's own name): enough to rebuild the instant.

    A tzinfo other than `datetime.timezone` (e.g. zoneinfo) travels as its offset at
    that moment, a documented simplification: zone rules are code, not data.
    """
    if value.tzinfo is None:
        return b""
    offset = value.utcoffset()
    if offset is None:
        raise Unrepresentable(type_name(type(value.tzinfo)), "no fixed UTC offset")
    name = b""
    tz = value.tzinfo
    if isinstance(tz, datetime.timezone) and tz.tzname(None) != datetime.timezone(offset).tzname(None):
        name = (tz.tzname(None) or "").encode()
    return _TZ.pack(offset // datetime.timedelta(microseconds=1)) + name


def _encode_datetime(_: _Encoder, v: datetime.datetime) -> msgpack.ExtType:
    clock = _CLOCK.pack(v.hour, v.minute, v.second, v.microsecond, v.fold)
    return msgpack.ExtType(_DATETIME, _DATE_S.pack(v.year, v.month, v.day) + clock + _tz(v))


def _encode_time(_: _Encoder, v: datetime.time) -> msgpack.ExtType:
    return msgpack.ExtType(_TIME, _CLOCK.pack(v.hour, v.minute, v.second, v.microsecond, v.fold) + _tz(v))


def _encode_path(_: _Encoder, v: pathlib.PurePath) -> msgpack.ExtType:
    return msgpack.ExtType(_PATH, bytes([_PATH_CLASSES.index(type(v))]) + str(v).encode())


_LEAVES: dict[type, Callable[[_Encoder, Any], Any]] = {
    int: _encode_bigint,
    complex: lambda _, v: msgpack.ExtType(_COMPLEX, _COMPLEX_S.pack(v.real, v.imag)),
    bytearray: _Encoder.bytearray_,
    datetime.date: lambda _, v: msgpack.ExtType(_DATE, _DATE_S.pack(v.year, v.month, v.day)),
    datetime.datetime: _encode_datetime,
    datetime.time: _encode_time,
    datetime.timedelta: lambda _, v: msgpack.ExtType(
        _TIMEDELTA, _TIMEDELTA_S.pack(v.days, v.seconds, v.microseconds)
    ),
    decimal.Decimal: _encode_decimal,
    fractions.Fraction: _encode_fraction,
    uuid.UUID: lambda _, v: msgpack.ExtType(_UUID, v.bytes),
    **{cls: _encode_path for cls in _PATH_CLASSES},
}


# -- decoding (runs on the requester: every byte is hostile) ---------------------------


def loads(buffers: Sequence[Buffer], *, trusted: bool = False) -> Any:
    """Decode what `dumps` produced.

    Args:
        buffers: The frame, then the out-of-band buffers (memoryviews slicing the
            received frame: numpy arrays are built on them without a copy).
        trusted: Also rebuild dataclasses, NamedTuples and Enums of installed
            libraries (the standard library, site-packages), whose constructors the
            requester did not write; untrusted results may only name classes of the
            requester's own modules (``__main__`` and its own code).

    Raises:
        DataError: the buffers are not a valid encoding, break a bound, or name a
            class the requester does not have (or that is not of the kind named).
    """
    if not buffers:
        raise DataError("a data result needs a frame")
    frame = memoryview(buffers[0]).cast("B")
    decoder = _Decoder([memoryview(b).cast("B") for b in buffers[1:]], trusted)
    limits = {
        "max_str_len": frame.nbytes,
        "max_bin_len": frame.nbytes,
        "max_array_len": frame.nbytes,
        "max_map_len": frame.nbytes // 2,
        "max_ext_len": frame.nbytes,
    }
    try:
        if frame.nbytes > _UNCHECKED:
            _check_lengths(frame, limits)
        value = msgpack.unpackb(
            frame,
            ext_hook=decoder.ext,
            list_hook=decoder.list,
            object_pairs_hook=decoder.pairs,
            strict_map_key=False,
            raw=False,
            timestamp=1,  # msgpack's own ext -1 becomes a float, never a Timestamp object
            **limits,
        )
    except DataError:
        raise
    except RecursionError:
        raise DataError("result nested too deeply") from None
    except Exception as exc:  # msgpack's errors, and what our hooks' constructors raise
        raise DataError(f"malformed data result: {type(exc).__name__}: {exc}") from None
    if decoder.markers:
        raise DataError("a marker extension appeared outside the head of a list")
    if not all(decoder.used):
        raise DataError("an out-of-band buffer was sent but not used")
    return value


def _check_lengths(frame: memoryview, limits: dict[str, int]) -> None:
    """Walk the frame without building anything: every declared length must be
    backed by bytes present, before `unpackb` preallocates for it."""
    chunk = max(16, min(frame.nbytes, 1 << 20))
    unpacker = msgpack.Unpacker(
        _Reader(frame), read_size=chunk, max_buffer_size=max(chunk, frame.nbytes), **limits
    )
    try:
        unpacker.skip()
    except msgpack.OutOfData:
        raise DataError("data result truncated: a length exceeds the bytes sent") from None
    except msgpack.StackError:
        raise DataError("result nested deeper than 1024 levels") from None
    if unpacker.tell() != frame.nbytes:
        raise DataError("data result has trailing bytes")


class _Reader:
    """A file over a memoryview, handing msgpack's Unpacker bounded slices (no copy of
    the whole frame, as ``io.BytesIO(memoryview)`` would make)."""

    def __init__(self, view: memoryview) -> None:
        self.view, self.pos = view, 0

    def read(self, n: int) -> bytes:
        chunk = self.view[self.pos : self.pos + n]
        self.pos += len(chunk)
        return bytes(chunk)


class _Marker:
    """What a marker extension decodes to until its list is rebuilt."""

    __slots__ = ("build", "cls")

    def __init__(self, build: Callable[[_Decoder, _Marker, list[Any]], Any], cls: Any = None) -> None:
        self.build, self.cls = build, cls


class _Decoder:
    """The state of one decoding: which out-of-band buffers were used, and the markers
    waiting for their list to complete.

    msgpack builds bottom-up in document order, so the waiting markers form a stack:
    a list headed by a marker must find that very marker on top when it completes.
    Any other marker on top was smuggled somewhere inside the list (not at a head),
    and the frame is refused there, before a class is called with it as a field.
    """

    def __init__(self, oob: list[memoryview], trusted: bool) -> None:
        self.oob, self.used, self.trusted = oob, [False] * len(oob), trusted
        self.markers: list[_Marker] = []

    def take(self, data: bytes) -> memoryview:
        if len(data) != _U32.size:
            raise DataError("bad out-of-band reference")
        (index,) = _U32.unpack(data)
        if index >= len(self.oob) or self.used[index]:
            raise DataError(f"out-of-band buffer {index} missing or used twice")
        self.used[index] = True
        return self.oob[index]

    def ext(self, code: int, data: bytes) -> Any:
        if code in _MARKER_BUILDERS:
            build = _MARKER_BUILDERS[code]
            if code in (_TUPLE, _SET, _FROZENSET):
                if data:
                    raise DataError("container marker with a payload")
                marker = _Marker(build)
            else:
                marker = _Marker(build, self.find_class(code, data))
            self.markers.append(marker)
            return marker
        decode = _EXT_DECODERS.get(code)
        if decode is None:
            raise DataError(f"unknown extension type {code}")
        return decode(self, data)

    def list(self, items: list[Any]) -> Any:
        if items and type(items[0]) is _Marker:
            marker = items[0]
            if not self.markers or self.markers.pop() is not marker:
                raise DataError("a marker extension appeared outside the head of a list")
            return marker.build(self, marker, items)
        return items

    def pairs(self, pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
        if len(pairs) > _SMALL:
            _check_hashes(map(itemgetter(0), pairs), len(pairs))
        out = dict(pairs)
        if len(out) != len(pairs):
            raise DataError("dict with repeated keys")
        return out

    def find_class(self, code: int, data: bytes) -> type:
        """The class a marker names, from the requester's own loaded modules only."""
        if len(data) > _NAME_LIMIT:
            raise DataError("class name too long")
        name = data.decode("utf-8", "replace")
        if code == _EXCEPTION:
            cls = _BUILTIN_EXCEPTIONS.get(name)
            if cls is None:
                raise DataError(f"{name!r} is not a builtin exception")
            return cls
        module_name, _, qualname = name.partition(":")
        kind = {_DATACLASS: "dataclass", _NAMEDTUPLE: "NamedTuple", _ENUM: "Enum"}[code]
        return _own_class(module_name, qualname, kind, lambda cls: _is_kind(code, cls), self.trusted)


def _own_class(
    module_name: str, qualname: str, kind: str, is_kind: Callable[[type], bool], trusted: bool
) -> type:
    """The class ``module_name:qualname`` of this process, or DataError.

    Looked up only in modules already imported, through their and their classes'
    ``__dict__`` (no module ``__getattr__`` runs, nothing is imported); the object
    found must be a class of exactly that name (not an alias or a function) and of
    the kind asked for, from the requester's own code unless ``trusted``.
    """
    name = f"{module_name}:{qualname}"
    module = sys.modules.get(module_name)
    found: Any = module
    for part in qualname.split("."):
        space = getattr(found, "__dict__", None) if found is not None else None
        found = space.get(part) if isinstance(space, dict | type(type.__dict__)) else None
    if module is None or not isinstance(found, type):
        raise DataError(f"the result holds a {kind} {name!r}, which is not a class this process has loaded")
    if found.__module__ != module_name or found.__qualname__ != qualname:
        raise DataError(f"{name!r} names {found.__module__}:{found.__qualname__}, not itself")
    if not is_kind(found):
        raise DataError(f"{name!r} is not a {kind}")
    if not trusted and _is_library(module):
        raise DataError(
            f"{name!r} belongs to an installed library, not the requester's own code; "
            "pass trust_results=True to rebuild library classes"
        )
    return found


def own_exception_class(type_name: str, *, trusted: bool = False) -> type[Exception] | None:
    """The requester's own exception class named ``module.qualname`` (as
    `codec.format_exception` names it), or None. Tries each split of the dotted name
    into an already-imported module and a qualified name within it."""
    if len(type_name) > _NAME_LIMIT:
        return None
    parts = type_name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module_name, qualname = ".".join(parts[:cut]), ".".join(parts[cut:])
        if module_name not in sys.modules:
            continue
        try:
            return _own_class(
                module_name, qualname, "exception", lambda cls: issubclass(cls, Exception), trusted
            )
        except DataError:
            return None
    return None


def _is_kind(code: int, cls: type) -> bool:
    if code == _DATACLASS:
        return dataclasses.is_dataclass(cls) and not issubclass(cls, enum.Enum)
    if code == _NAMEDTUPLE:
        return issubclass(cls, tuple) and isinstance(cls.__dict__.get("_fields"), tuple)
    return issubclass(cls, enum.Enum)


def _is_library(module: Any) -> bool:
    name = getattr(module, "__name__", "")
    if name == "__main__":
        return False
    if name.partition(".")[0] in _LIBRARY_PACKAGES:
        return True
    path = getattr(module, "__file__", None)
    return path is None or os.path.realpath(path).startswith(_LIBRARY_ROOTS)


def _check_hashes(keys: Any, count: int) -> None:
    """Refuse keys whose hashes repeat: building a dict of them is quadratic."""
    try:
        distinct = len(set(map(hash, keys)))
    except TypeError as exc:
        raise DataError(f"unhashable key or set item: {exc}") from None
    if distinct < count - HASH_REPEATS:
        raise DataError(f"{count - distinct} keys or set items share hashes (a hash-collision attack?)")


def _rest(items: list[Any]) -> Any:
    return itertools.islice(items, 1, None)


def _build_set(decoder: _Decoder, marker: _Marker, items: list[Any]) -> Any:
    if len(items) > _SMALL:
        _check_hashes(_rest(items), len(items) - 1)
    out = set(_rest(items))
    if len(out) != len(items) - 1:
        raise DataError("set with repeated items")
    return out


def _build_frozenset(decoder: _Decoder, marker: _Marker, items: list[Any]) -> Any:
    return frozenset(_build_set(decoder, marker, items))


def _build_dataclass(decoder: _Decoder, marker: _Marker, items: list[Any]) -> Any:
    if len(items) != 2 or type(items[1]) is not dict or not all(type(k) is str for k in items[1]):
        raise DataError(f"bad fields for dataclass {marker.cls.__qualname__}")
    return _call(marker.cls, (), items[1])


def _build_exception(decoder: _Decoder, marker: _Marker, items: list[Any]) -> Any:
    if len(items) != 3 or type(items[1]) is not list or not isinstance(items[2], str | None):
        raise DataError(f"bad fields for exception {marker.cls.__name__}")
    exc = _call(marker.cls, items[1], {})
    if items[2] is not None:
        exc.__cause__ = RemoteTraceback(items[2])
    return exc


def _build_enum(decoder: _Decoder, marker: _Marker, items: list[Any]) -> Any:
    cls = marker.cls
    if len(items) != 2:
        raise DataError(f"bad value for Enum {cls.__qualname__}")
    value = items[1]
    if issubclass(cls, enum.Flag) and value not in cls._value2member_map_:
        # A Flag caches a new pseudo-member for every combination it is asked for:
        # only combinations of its own bits, so no result grows that cache unboundedly.
        mask = getattr(cls, "_flag_mask_", None)
        if type(value) is not int or not isinstance(mask, int) or value & ~mask:
            raise DataError(f"{value!r:.40} is not a combination of {cls.__qualname__}'s flags")
    return _call(cls, (value,), {})


def _call(cls: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    try:
        return cls(*args, **kwargs)
    except Exception as exc:
        raise DataError(f"could not rebuild {type_name(cls)}: {type(exc).__name__}: {exc}") from None


_MARKER_BUILDERS: dict[int, Callable[[_Decoder, _Marker, list[Any]], Any]] = {
    _TUPLE: lambda d, m, items: tuple(_rest(items)),
    _SET: _build_set,
    _FROZENSET: _build_frozenset,
    _DATACLASS: _build_dataclass,
    _NAMEDTUPLE: lambda d, m, items: _call(m.cls, list(_rest(items)), {}),
    _ENUM: _build_enum,
    _EXCEPTION: _build_exception,
}
_MARK = {code: msgpack.ExtType(code, b"") for code in (_TUPLE, _SET, _FROZENSET)}


def _int(data: bytes) -> int:
    if not data or len(data) > MAX_INT_BYTES:
        raise DataError(f"int of {len(data)} bytes (at most {MAX_INT_BYTES}: {MAX_INT_DIGITS} digits)")
    value = int.from_bytes(data, "big", signed=True)
    if not -_INT_LIMIT < value < _INT_LIMIT:
        raise DataError(f"int over {MAX_INT_DIGITS} digits")
    return value


def _decode_fraction(_: _Decoder, data: bytes) -> fractions.Fraction:
    if len(data) < _U16.size:
        raise DataError("short Fraction")
    (size,) = _U16.unpack_from(data)
    top, bottom = _int(data[2 : 2 + size]), _int(data[2 + size :])
    if bottom <= 0:
        raise DataError("Fraction denominator must be positive")
    return fractions.Fraction(top, bottom)


def _decode_decimal(_: _Decoder, data: bytes) -> decimal.Decimal:
    text = data.decode("ascii", "replace")
    if len(text) > 2 * MAX_DECIMAL_DIGITS or not _DECIMAL_TEXT.match(text):
        raise DataError("malformed Decimal")
    value = decimal.Decimal(text)
    _sign, digits, exponent = value.as_tuple()
    if len(digits) > MAX_DECIMAL_DIGITS or (isinstance(exponent, int) and abs(exponent) > MAX_DECIMAL_DIGITS):
        raise DataError(f"Decimal over {MAX_DECIMAL_DIGITS} digits or exponent")
    return value


def _decode_tz(data: bytes) -> datetime.timezone | None:
    if not data:
        return None
    if len(data) < _TZ.size:
        raise DataError("short UTC offset")
    (micros,) = _TZ.unpack_from(data)
    offset = datetime.timedelta(microseconds=micros)
    name = data[_TZ.size :]
    return datetime.timezone(offset, name.decode()) if name else datetime.timezone(offset)


def _decode_datetime(_: _Decoder, data: bytes) -> datetime.datetime:
    size = _DATE_S.size + _CLOCK.size
    if len(data) < size:
        raise DataError("short datetime")
    date, clock = _DATE_S.unpack_from(data), _CLOCK.unpack_from(data, _DATE_S.size)
    hour, minute, second, micro, fold = clock
    return datetime.datetime(*date, hour, minute, second, micro, _decode_tz(data[size:]), fold=fold)


def _decode_time(_: _Decoder, data: bytes) -> datetime.time:
    if len(data) < _CLOCK.size:
        raise DataError("short time")
    hour, minute, second, micro, fold = _CLOCK.unpack_from(data)
    return datetime.time(hour, minute, second, micro, _decode_tz(data[_CLOCK.size :]), fold=fold)


def _decode_path(_: _Decoder, data: bytes) -> pathlib.PurePath:
    """Concrete paths come back as `pathlib.Path` when the sender's flavour is ours
    (building one touches no file), else as the pure path of their flavour."""
    if not data or data[0] >= len(_PATH_CLASSES):
        raise DataError("bad path kind")
    cls = _PATH_CLASSES[data[0]]
    if cls is pathlib.PosixPath and os.name != "posix":
        cls = pathlib.PurePosixPath
    elif cls is pathlib.WindowsPath and os.name != "nt":
        cls = pathlib.PureWindowsPath
    return cls(data[1:].decode())


def _decode_array(decoder: _Decoder, data: bytes) -> Any:
    """A numpy array (or scalar) of a plain dtype whose bytes are exactly its size."""
    if len(data) < _ARRAY_HEAD.size:
        raise DataError("short array header")
    flags, ndim, spec_size = _ARRAY_HEAD.unpack_from(data)
    pos = _ARRAY_HEAD.size + spec_size + 8 * ndim
    if ndim > _MAX_DIMS or len(data) < pos:
        raise DataError("bad array header")
    numpy = _numpy()
    spec = data[_ARRAY_HEAD.size : _ARRAY_HEAD.size + spec_size]
    shape = struct.unpack_from(f"!{ndim}Q", data, _ARRAY_HEAD.size + spec_size)
    dtype = _dtype(numpy, spec, structured=bool(flags & _STRUCTURED))
    count = 1
    for dim in shape:
        if dim > _MAX_DIM:
            raise DataError("array dimension too large")
        count *= dim
    body: Any = decoder.take(data[pos:]) if flags & _IS_OOB else data[pos:]
    if dtype.itemsize == 0 or count * dtype.itemsize != len(body):
        raise DataError(f"array of {count} x {dtype.itemsize} bytes sent with {len(body)} bytes")
    if not flags & _IS_OOB:
        body = bytearray(body)  # a writable copy, as the sender's array was (in-band ones are small)
    order = "F" if flags & _F_ORDER else "C"
    arr = numpy.ndarray(shape, dtype=dtype, buffer=body, order=order)
    if flags & _IS_SCALAR:
        if ndim:
            raise DataError("numpy scalar with a shape")
        return arr[()]
    return arr


def _dtype(numpy: Any, spec: bytes, *, structured: bool) -> Any:
    try:
        if structured:
            descr = msgpack.unpackb(spec, max_str_len=len(spec), max_array_len=len(spec), max_map_len=0)
            dtype = numpy.lib.format.descr_to_dtype(_tuples(descr))
        else:
            dtype = numpy.dtype(spec.decode("ascii"))
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"bad numpy dtype: {exc}") from None
    if not isinstance(dtype, numpy.dtype) or dtype.hasobject or not _plain(dtype):
        raise DataError(f"numpy dtype {dtype} holds Python objects or pointers: not data")
    return dtype


#: numpy's classic kinds of fixed-size values (bool, ints, floats, complex, datetimes,
#: bytes, unicode, void). New-style dtypes (StringDType "T", user dtypes) keep pointers.
_PLAIN_KINDS = frozenset("biufcmMSUV")


def _plain(dtype: Any) -> bool:
    """Whether ``dtype`` and every field and subarray in it is of a classic kind."""
    if dtype.kind not in _PLAIN_KINDS:
        return False
    if dtype.subdtype is not None:
        return _plain(dtype.subdtype[0])
    return all(_plain(field[0]) for field in (dtype.fields or {}).values())


def _tuples(descr: Any) -> Any:
    """msgpack lists back into numpy's descr form: a list of (name, format[, shape])."""
    if not isinstance(descr, list):
        return descr
    fields = []
    for field in descr:
        if not isinstance(field, list) or len(field) not in (2, 3):
            raise DataError("bad structured dtype field")
        name = tuple(field[0]) if isinstance(field[0], list) else field[0]
        rest = [_tuples(field[1])] + ([tuple(field[2])] if len(field) == 3 else [])
        fields.append((name, *rest))
    return fields


def _numpy() -> Any:
    numpy = sys.modules.get("numpy")
    if numpy is None:
        try:
            import numpy  # a fixed, well-known module: the result holds an array
        except ImportError:
            raise DataError("the result holds a numpy array, but numpy is not installed here") from None
    return numpy


def _fixed(size: int, build: Callable[[bytes], Any]) -> Callable[[_Decoder, bytes], Any]:
    def decode(_: _Decoder, data: bytes) -> Any:
        if len(data) != size:
            raise DataError(f"extension of {len(data)} bytes, expected {size}")
        return build(data)

    return decode


_EXT_DECODERS: dict[int, Callable[[_Decoder, bytes], Any]] = {
    _BIGINT: lambda _, data: _int(data),
    _COMPLEX: _fixed(_COMPLEX_S.size, lambda d: complex(*_COMPLEX_S.unpack(d))),
    _BYTEARRAY: lambda _, data: bytearray(data),
    _BYTEARRAY_OOB: lambda decoder, data: bytearray(decoder.take(data)),
    _DATE: _fixed(_DATE_S.size, lambda d: datetime.date(*_DATE_S.unpack(d))),
    _TIME: _decode_time,
    _DATETIME: _decode_datetime,
    _TIMEDELTA: _fixed(_TIMEDELTA_S.size, lambda d: datetime.timedelta(*_TIMEDELTA_S.unpack(d))),
    _DECIMAL: _decode_decimal,
    _FRACTION: _decode_fraction,
    _UUID: _fixed(16, lambda d: uuid.UUID(bytes=d)),
    _PATH: _decode_path,
    _NDARRAY: _decode_array,
}
