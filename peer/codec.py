"""Serialization of code and data: the only module that unpickles.

Code (functions) travels with dill, once per session, because only dill can pickle
lambdas and closures by value. Data travels with the C pickler at protocol 5 with
out-of-band buffers, because dill's pure-Python pickler is ~50x slower on plain data
and protocol 5 lets large arrays go out without copies; dill is the fallback for the
few objects the C pickler refuses, and a 1-byte flag says which one encoded a value.

Results from a peer are never unpickled by default: the sandbox encodes them as typed
data (`peer.datacodec`), which cannot express code, and only a requester that trusts
its peers (``trusted=True``) unpickles a result that could not travel as data.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import sys
import sysconfig
import threading
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import dill
import dill._dill

from peer import datacodec
from peer.errors import ProtocolError, UnsafeResultError

Buffer = bytes | bytearray | memoryview

PICKLE = b"\x00"
DILL = b"\x01"
#: A result as typed data (`peer.datacodec`), and a result that had to be pickled.
DATA = b"\x02"
CODE = b"\x03"
_NAME_LIMIT = 200
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


def dumps_result(obj: Any) -> list[Buffer]:
    """Encode a task's result: as data when it can be, else pickled and labelled.

    Runs in the sandbox child. ``[DATA, frame, *out_of_band]`` (`peer.datacodec`) is
    what every requester can decode; a value holding something else (a function, an
    instance of a class that is not a dataclass, ...) goes as
    ``[CODE, type name, *dumps_data(obj)]``, which only a requester that trusts its
    peers (``trust_results=True``) unpickles; the others refuse it naming the type.
    """
    try:
        return [DATA, *datacodec.dumps(obj)]
    except datacodec.Unrepresentable as exc:
        return [CODE, exc.type_name.encode()[:_NAME_LIMIT], *dumps_data(obj)]


def loads_data(buffers: Sequence[Buffer], *, trusted: bool) -> Any:
    """Decode what `dumps_data` or `dumps_result` produced.

    Args:
        buffers: The flag, then the stream (or frame) and the out-of-band buffers;
            numpy arrays are built on top of the out-of-band buffers without copying.
        trusted: False for results from a peer: only `peer.datacodec` data is
            decoded, and nothing is ever unpickled. True inside the sandbox (the
            requester's own arguments) or for peers the requester trusts.

    Raises:
        UnsafeResultError: untrusted buffers hold a pickle (a result that could not
            travel as data), named by its type.
        DataError: a data result is malformed or breaks one of the decoder's bounds.
        ProtocolError: the buffers are not a valid encoding.
    """
    if len(buffers) < 2:
        raise ProtocolError(f"encoded value needs at least 2 buffers, got {len(buffers)}")
    flag = bytes(buffers[0])
    if flag == DATA:
        return datacodec.loads(buffers[1:], trusted=trusted)
    if flag == CODE:
        raw = bytes(buffers[1][:_NAME_LIMIT]).decode("utf-8", "replace")
        name = "".join(c if c.isprintable() else "?" for c in raw)  # the peer chose it
        if not trusted:
            raise UnsafeResultError(
                f"the result holds a {name}, which cannot travel as data and would have to be "
                "unpickled (which can run code); pass trust_results=True to Pool to accept "
                "pickled results from peers you trust"
            )
        if len(buffers) < 4 or bytes(buffers[2]) not in (PICKLE, DILL):
            raise ProtocolError("a pickled result needs its type name, a pickle flag and a stream")
        return loads_data(buffers[2:], trusted=True)
    if flag not in (PICKLE, DILL):
        raise ProtocolError(f"unknown encoding flag {flag!r}")
    if not trusted:
        raise UnsafeResultError("untrusted values are decoded as data (peer.datacodec), never unpickled")
    stream, oob = buffers[1], buffers[2:]
    if flag == DILL:
        return dill.loads(stream, buffers=oob)
    return pickle.loads(stream, buffers=oob)


def format_exception(exc: BaseException) -> dict[str, str]:
    """Describe an exception as text for the wire (execnet style).

    A pickled exception would make the requester unpickle peer-chosen objects, and
    its class may not exist on the requester; a name, message and traceback do not.
    The exception's args go along as `peer.datacodec` data (base64) when they are data.
    Long messages and tracebacks are cut so the result fits a bounded JSON frame.
    """
    cls = type(exc)
    type_name = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    message = _clip(str(exc), _MESSAGE_LIMIT, keep_end=False)
    text = "".join(traceback.format_exception(exc))
    info = {"type": type_name, "message": message, "traceback": _clip(text, _TRACEBACK_LIMIT, keep_end=True)}
    if args := datacodec.error_args(exc):
        info["args"] = args  # so the requester rebuilds a builtin or its own type with them
    return info


def _clip(text: str, limit: int, *, keep_end: bool) -> str:
    """Shorten ``text`` to about ``limit`` characters, keeping the informative end."""
    if len(text) <= limit:
        return text
    if keep_end:
        return "[...]\n" + text[-limit:]
    return text[:limit] + " [...]"
