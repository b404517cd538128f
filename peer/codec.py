"""Serialization of code and data: the only module that unpickles.

Code (functions) travels with dill, once per session, because only dill can pickle
lambdas and closures by value. Data travels with the C pickler at protocol 5 with
out-of-band buffers, because dill's pure-Python pickler is ~50x slower on plain data
and protocol 5 lets large arrays go out without copies; dill is the fallback for the
few objects the C pickler refuses, and a 1-byte flag says which one encoded a value.

Results from a peer are decoded by default with an allow-list unpickler that can only
build data (builtins, a few stdlib value types, numpy arrays), so a malicious peer
cannot run code on the requester. ``trusted=True`` opts in to full pickle and dill.
"""

from __future__ import annotations

import collections
import copyreg
import datetime
import decimal
import fractions
import hashlib
import io
import os
import pickle
import re
import sys
import sysconfig
import threading
import traceback
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import dill
import dill._dill

from peer.errors import ProtocolError, UnsafeResultError

Buffer = bytes | bytearray | memoryview

PICKLE = b"\x00"
DILL = b"\x01"
_MESSAGE_LIMIT = 8 * 1024
_TRACEBACK_LIMIT = 32 * 1024


def dumps_code(fn: Callable[..., Any]) -> bytes:
    """Pickle a function by value with dill, following the globals it uses.

    ``recurse=True`` makes dill pickle only the globals the function refers to
    instead of the whole ``__main__`` namespace. Functions defined in importable
    modules other than ``__main__`` are pickled by reference, as pickle does, so the
    peer must be able to import that module. dill 0.4.1 recurses forever on a closure
    that refers to itself (a local recursive function) with ``recurse=True``; those
    are pickled without it, which also captures the closure's globals.
    """
    if not callable(fn):
        raise TypeError(f"expected a callable, got {type(fn).__name__}")
    with _BY_VALUE:
        try:
            return dill.dumps(fn, protocol=5, recurse=True)
        except RecursionError:
            return dill.dumps(fn, protocol=5, recurse=False)


# -- user code travels by value ------------------------------------------------------
# dill pickles a function or class "by reference" (module + name) whenever it can
# import it here, which would make the peer import the requester's own modules: they
# are not installed there. So anything outside the standard library, site-packages and
# this package travels by value, as ``__main__`` code does.
_LIBRARY_ROOTS = tuple(
    os.path.realpath(p) + os.sep
    for key in ("stdlib", "platstdlib", "purelib", "platlib")
    if (p := sysconfig.get_paths().get(key))
)
_BY_REFERENCE_PACKAGES = frozenset({"peer", "dill", "numpy"})
_locate_function = dill._dill._locate_function


def _is_library(module_name: str | None) -> bool:
    if module_name is None or module_name == "__main__":
        return module_name is None
    if module_name.partition(".")[0] in _BY_REFERENCE_PACKAGES:
        return True
    module = sys.modules.get(module_name)
    path = getattr(module, "__file__", None)
    if module is None or path is None:  # built-in or frozen
        return True
    return os.path.realpath(path).startswith(_LIBRARY_ROOTS)


def _locate_library_function(obj: Any, pickler: Any = None) -> bool:
    if not _is_library(getattr(obj, "__module__", None)):
        return False
    return _locate_function(obj, pickler)


class _ByValue:
    """Patch dill's "can I pickle this by reference?" test while dumping code (dill
    has no public switch for it), serialized by a lock."""

    _lock = threading.Lock()

    def __enter__(self) -> None:
        self._lock.acquire()
        dill._dill._locate_function = _locate_library_function

    def __exit__(self, *exc: object) -> None:
        dill._dill._locate_function = _locate_function
        self._lock.release()


_BY_VALUE = _ByValue()


def code_id(code: Buffer) -> str:
    """Name pickled code by its content, so both sides agree on a cache key."""
    return hashlib.blake2b(code, digest_size=16).hexdigest()


def loads_code(payload: Buffer) -> Callable[..., Any]:
    """Load a function pickled by `dumps_code`.

    This runs arbitrary code by design; the peer calls it only inside the sandbox
    and only for a session it has authenticated.
    """
    return dill.loads(payload)


class _NeedsDill(Exception):
    """The C pickler produced a stream the other side could not load."""


class _DataPickler(pickle.Pickler):
    """The C pickler, refusing (so that dill takes over, by value) any class or
    function the receiving process could not import: those of ``__main__`` and of the
    requester's own modules. Plain data never reaches ``reducer_override``'s check."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, type) or (callable(obj) and hasattr(obj, "__code__")):
            if not _is_library(getattr(obj, "__module__", None)):
                raise _NeedsDill
        return NotImplemented


def dumps_data(obj: Any) -> list[Buffer]:
    """Encode a value as ``[flag, pickle stream, *out-of-band buffers]``.

    The out-of-band buffers are views of the objects' own memory (e.g. a numpy
    array's data), so sending them with `wire.write_frame` copies nothing.
    Objects that reference ``__main__`` are re-encoded with dill, because the
    C pickler stores them by a name the receiving process does not have.
    """
    oob: list[pickle.PickleBuffer] = []
    try:
        out = io.BytesIO()
        _DataPickler(out, protocol=5, buffer_callback=oob.append).dump(obj)
        stream = out.getbuffer()
        flag = PICKLE
    except (pickle.PicklingError, TypeError, AttributeError, _NeedsDill):
        oob = []
        with _BY_VALUE:
            stream = dill.dumps(obj, protocol=5, recurse=True, buffer_callback=oob.append)
        flag = DILL
    return [flag, stream, *(buf.raw() for buf in oob)]


def loads_data(buffers: Sequence[Buffer], *, trusted: bool) -> Any:
    """Decode what `dumps_data` produced.

    Args:
        buffers: The flag, the pickle stream and the out-of-band buffers; numpy
            arrays are built on top of the out-of-band buffers without copying.
        trusted: False for results from a peer: only allow-listed data types may
            be built and dill-encoded values are refused. True inside the sandbox
            (the requester's own arguments) or for peers the requester trusts.

    Raises:
        UnsafeResultError: untrusted data needed a global outside the allow-list
            or was encoded with dill.
        ProtocolError: the buffers are not a valid encoding.
    """
    if len(buffers) < 2:
        raise ProtocolError(f"encoded value needs at least 2 buffers, got {len(buffers)}")
    flag, stream, oob = bytes(buffers[0]), buffers[1], buffers[2:]
    if flag == DILL:
        if not trusted:
            raise UnsafeResultError(
                "value was encoded with dill, which can run code; "
                "decode it only from a trusted peer (trusted=True)"
            )
        return dill.loads(stream, buffers=oob)
    if flag != PICKLE:
        raise ProtocolError(f"unknown encoding flag {flag!r}")
    if trusted:
        return pickle.loads(stream, buffers=oob)
    # A class can only be reached through its name in the stream (GLOBAL or
    # STACK_GLOBAL): without one of those names there is nothing to check.
    before = _class_state() if _MUTABLE_NAMES.search(stream) else {}  # no copy of the stream
    try:
        return _DataUnpickler(io.BytesIO(stream), buffers=oob).load()
    except UnsafeResultError:
        raise
    except Exception as exc:
        raise ProtocolError(f"malformed result pickle: {exc!r}") from exc
    finally:
        _restore_classes(before)


def _class_state() -> dict[type, dict[str, Any]]:
    """The attributes of the allow-listed classes written in Python (C types cannot be
    changed). A pickle's BUILD can set attributes on a *class* it names, so an
    untrusted load is followed by a check that none changed."""
    return {cls: dict(vars(cls)) for cls in _MUTABLE_SAFE_TYPES}


def _restore_classes(before: dict[type, dict[str, Any]]) -> None:
    tampered = []
    for cls, attrs in before.items():
        now = vars(cls)
        if len(now) == len(attrs) and all(now.get(k, attrs) is v for k, v in attrs.items()):
            continue
        tampered.append(cls.__name__)
        for key in set(now) - set(attrs):
            delattr(cls, key)
        for key, value in attrs.items():
            if now.get(key, attrs) is not value:
                setattr(cls, key, value)
    if tampered:
        raise UnsafeResultError(f"an untrusted result tried to change the classes {', '.join(tampered)}")


_SAFE_TYPES: frozenset[type] = frozenset(
    {
        int,
        float,
        complex,
        str,
        bytes,
        bytearray,
        list,
        tuple,
        dict,
        set,
        frozenset,
        bool,
        slice,
        range,
        collections.OrderedDict,
        collections.defaultdict,
        collections.deque,
        collections.Counter,
        datetime.date,
        datetime.datetime,
        datetime.time,
        datetime.timedelta,
        datetime.timezone,
        decimal.Decimal,
        fractions.Fraction,
        uuid.UUID,
        uuid.SafeUUID,
    }
)

_MUTABLE_SAFE_TYPES = tuple(
    cls
    for cls in _SAFE_TYPES
    if not cls.__flags__ & (1 << 8)  # Py_TPFLAGS_IMMUTABLETYPE
)

_MUTABLE_NAMES = re.compile(b"|".join(re.escape(cls.__name__.encode()) for cls in _MUTABLE_SAFE_TYPES))

_NUMPY_GLOBALS = {
    ("numpy", "dtype"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
}
_NUMPY_RECONSTRUCT = {("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct")}


class _NdarrayToken:
    """What ``numpy.ndarray`` resolves to in an untrusted result.

    numpy pickles arrays as ``_reconstruct(ndarray, shape, dtype)`` and needs the class
    only as that first argument. Calling ``ndarray(shape, dtype, buffer)`` directly
    would let a peer build an object array whose pointers are bytes it chose (memory
    corruption on the requester), so the class itself is never handed out.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise UnsafeResultError("refusing to call numpy.ndarray directly in an untrusted result")


_NDARRAY = _NdarrayToken()


def _safe_numpy_reconstruct(subtype: Any, shape: Any, dtype: Any) -> Any:
    """Stand in for numpy's ``_reconstruct``: plain ndarrays of non-object dtypes only
    (their contents then come through ``__setstate__``, which numpy checks)."""
    import numpy

    if subtype is not _NDARRAY:
        raise UnsafeResultError("refusing numpy _reconstruct of anything but numpy.ndarray")
    if numpy.dtype(dtype).hasobject:
        raise UnsafeResultError("refusing a numpy array of Python objects in an untrusted result")
    return numpy._core.multiarray._reconstruct(numpy.ndarray, shape, dtype)


def _type_of_singleton(*args: Any) -> type:
    """Stand in for ``builtins.type``, which pickle uses only to rebuild NoneType.

    The real ``type`` would also accept three arguments and create a class.
    """
    if len(args) == 1 and args[0] in (None, NotImplemented, Ellipsis):
        return type(args[0])
    raise UnsafeResultError("refusing builtins.type except for type(None)")


#: Sizes a constructor called by an untrusted pickle may be asked for: ``bytes(2**35)``
#: or ``list(range(10**12))`` are a few bytes on the wire and all the memory here.
_MAX_CONSTRUCTED = 1 << 26
#: Built from REDUCE (a call) in ordinary pickles; handed out only behind `_Guarded`.
_CALLED_TYPES = frozenset(
    {bytes, bytearray, list, tuple, set, frozenset, dict, str, range, complex, slice,
     collections.deque, collections.Counter, collections.OrderedDict, collections.defaultdict}
)  # fmt: skip


def _too_big(value: Any) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        return abs(value) > _MAX_CONSTRUCTED
    if isinstance(value, range):
        return len(value) > _MAX_CONSTRUCTED
    return False


class _Guarded:
    """A constructor as an untrusted pickle may call it: arguments that would build
    something huge out of a few bytes (a count, a range) are refused."""

    def __init__(self, wrapped: type) -> None:
        self.wrapped = wrapped

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if any(_too_big(a) for a in (*args, *kwargs.values())):
            raise UnsafeResultError(
                f"refusing {self.wrapped.__name__}() of a huge size in an untrusted result"
            )
        return self.wrapped(*args, **kwargs)


_GUARDED = {cls: _Guarded(cls) for cls in _CALLED_TYPES}


def _safe_reconstructor(cls: type, base: type, state: Any) -> Any:
    """Stand in for ``copyreg._reconstructor``, limited to allow-listed types."""
    cls = getattr(cls, "wrapped", cls)
    base = getattr(base, "wrapped", base)
    if cls not in _SAFE_TYPES or (base is not object and base not in _SAFE_TYPES):
        raise UnsafeResultError(f"refusing copyreg._reconstructor for {cls!r}")
    return copyreg._reconstructor(cls, base, state)  # type: ignore[attr-defined]


class _DataUnpickler(pickle.Unpickler):
    """An unpickler that can only build data: every global goes through an allow-list."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("builtins", "type"):
            return _type_of_singleton
        if (module, name) == ("copyreg", "_reconstructor"):
            return _safe_reconstructor
        if (module, name) == ("numpy", "ndarray"):
            return _NDARRAY
        if (module, name) in _NUMPY_RECONSTRUCT:
            return _safe_numpy_reconstruct
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        if module == "numpy.dtypes" and name.endswith("DType"):
            found = self._lookup(module, name)
            if isinstance(found, type):
                return found
        if module in {"builtins", "collections", "datetime", "decimal", "fractions", "uuid"}:
            found = self._lookup(module, name)
            if isinstance(found, type) and found in _SAFE_TYPES:
                return _GUARDED.get(found, found)
        raise UnsafeResultError(
            f"refusing to load global {module}.{name}: results from untrusted peers "
            "may contain only data; pass trusted=True for peers you trust"
        )

    def _lookup(self, module: str, name: str) -> Any:
        """Resolve a name in an allow-listed module; unknown names resolve to None."""
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return None


def format_exception(exc: BaseException) -> dict[str, str]:
    """Describe an exception as text for the wire (execnet style).

    A pickled exception would make the requester unpickle peer-chosen objects, and
    its class may not exist on the requester; a name, message and traceback do not.
    Long messages and tracebacks are cut so the result fits a bounded JSON frame.
    """
    cls = type(exc)
    type_name = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    message = _clip(str(exc), _MESSAGE_LIMIT, keep_end=False)
    text = "".join(traceback.format_exception(exc))
    return {"type": type_name, "message": message, "traceback": _clip(text, _TRACEBACK_LIMIT, keep_end=True)}


def _clip(text: str, limit: int, *, keep_end: bool) -> str:
    """Shorten ``text`` to about ``limit`` characters, keeping the informative end."""
    if len(text) <= limit:
        return text
    if keep_end:
        return "[...]\n" + text[-limit:]
    return text[:limit] + " [...]"
