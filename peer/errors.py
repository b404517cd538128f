"""Exceptions raised by the peer package.

Everything the peer and the requester library raise on purpose derives from
`PeerError`, so callers can catch the package's failures in one place while
programming errors (TypeError, KeyError, ...) still surface as themselves.
"""

from __future__ import annotations

import builtins
import linecache
import re
from collections.abc import Sequence
from typing import Any


class PeerError(Exception):
    """Base class of every error the peer package raises on purpose."""


class ProtocolError(PeerError):
    """The other side sent something that is not a valid frame or message.

    Raised before anything is deserialized, so a malformed or hostile stream never
    reaches the unpickler.
    """


class ConnectionClosed(ProtocolError):
    """The other side closed the connection cleanly, between two frames."""


class TaskError(PeerError):
    """A remote task failed.

    The failure travels as text (execnet style), never as a pickled exception: the
    requester must not unpickle objects chosen by a peer. When the remote type is a
    builtin exception, the requester raises an instance of a subclass of both
    TaskError and that type (`remote_error`), so ``except ValueError:`` and
    ``except TaskError:`` both work, with the remote traceback as its ``__cause__``.

    Attributes:
        type_name: Name of the remote exception type, e.g. ``"ZeroDivisionError"``,
            or a sandbox-level cause such as ``"TimeoutError"`` or ``"SandboxDied"``.
        message: ``str()`` of the remote exception, or a description of the cause.
        traceback_text: The formatted remote traceback; empty when there is none
            (a task killed from outside has no Python traceback).
        encoded_args: The remote exception's args as `peer.datacodec` data (base64),
            passed through by the daemon untouched; empty when they were not data.
    """

    #: Whether ``str()`` ends with the remote traceback (rebuilt builtin types carry it
    #: as their ``__cause__`` instead, so a printed traceback shows it once).
    _traceback_in_str = True

    def __init__(
        self, type_name: str, message: str, traceback_text: str = "", *, encoded_args: str = ""
    ) -> None:
        # Not super().__init__: a rebuilt OSError or UnicodeError base would read these
        # three strings as its own fields. `remote_error` then sets the remote args.
        BaseException.__init__(self, type_name, message, traceback_text)
        self.type_name = type_name
        self.message = message
        self.traceback_text = traceback_text
        self.encoded_args = encoded_args

    def __str__(self) -> str:
        head = f"{self.type_name}: {self.message}"
        if not self.traceback_text or not self._traceback_in_str:
            return head
        return f"{head}\n\nRemote traceback:\n{with_local_source(self.traceback_text).rstrip()}"

    def __reduce__(self) -> tuple[Any, ...]:
        rebuilt = type(self) is not TaskError
        return (
            remote_error,
            (self.type_name, self.message, self.traceback_text, self.args if rebuilt else None),
        )

    def to_dict(self) -> dict[str, str]:
        """Return the JSON-ready form used on the wire (see `codec.format_exception`)."""
        out = {"type": self.type_name, "message": self.message, "traceback": self.traceback_text}
        if self.encoded_args:
            out["args"] = self.encoded_args
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskError:
        """Build a TaskError from a decoded ERROR message, tolerating missing keys.

        The dict comes from another process, so every field is coerced to ``str``
        rather than trusted to have the right type.
        """
        args = data.get("args", "")
        return cls(
            str(data.get("type", "RemoteError")),
            str(data.get("message", "")),
            str(data.get("traceback", "")),
            encoded_args=args if isinstance(args, str) and len(args) <= ERROR_ARGS_LIMIT else "",
        )


#: Bytes of base64 args an ERROR message may carry (the rest travels as the message).
ERROR_ARGS_LIMIT = 8 * 1024
#: Builtin exceptions raised here as plain TaskErrors: control flow (a StopIteration out
#: of ``result()`` would end the caller's generator), groups (their constructor takes
#: exceptions), and BaseException-only types (SystemExit, KeyboardInterrupt).
_NOT_REBUILT = frozenset({"StopIteration", "StopAsyncIteration", "ExceptionGroup"})
_REMOTE_TYPES: dict[type[BaseException], type[TaskError]] = {}


def remote_error(
    type_name: str,
    message: str,
    traceback_text: str = "",
    args: Sequence[Any] | None = None,
    encoded_args: str = "",
    *,
    base: type[Exception] | None = None,
) -> TaskError:
    """The exception to raise for a remote failure.

    For a builtin exception type (looked up by name in the builtins table only), or
    ``base`` (a class of the requester's own that the caller found): an instance of
    a subclass of TaskError and that type, with ``args`` (the remote
    exception's, when they were data; else the message) and the remote traceback as
    its ``__cause__``, as `concurrent.futures.ProcessPoolExecutor` does. Anything else
    is a plain TaskError carrying the type name, message and traceback.
    """
    builtin = base if base is not None else vars(builtins).get(type_name)
    cls = _remote_type(builtin) if type_name not in _NOT_REBUILT else None
    if cls is None or builtin is None:
        return TaskError(type_name, message, traceback_text, encoded_args=encoded_args)
    exc = cls(type_name, message, traceback_text, encoded_args=encoded_args)
    values = tuple(args) if args is not None else (message,)
    try:
        builtin.__init__(exc, *values)
    except Exception:  # args that do not fit the type's constructor
        BaseException.__init__(exc, *values)
    if traceback_text:
        exc.__cause__ = RemoteTraceback(traceback_text)
    return exc


def _remote_type(builtin: Any) -> type[TaskError] | None:
    """``RemoteValueError(TaskError, ValueError)`` and the like, made once per type
    (the cache holds builtins and the requester's own exception classes only)."""
    if not (isinstance(builtin, type) and issubclass(builtin, Exception)) or issubclass(builtin, TaskError):
        return None
    cls = _REMOTE_TYPES.get(builtin)
    if cls is None:
        try:
            cls = type(
                f"Remote{builtin.__name__}",
                (TaskError, builtin),
                {
                    "__module__": __name__,
                    "_traceback_in_str": False,
                    "__doc__": f"A remote {builtin.__name__}.",
                },
            )
        except TypeError:  # a layout that cannot be combined: stay a plain TaskError
            return None
        _REMOTE_TYPES[builtin] = cls
    return cls


class SandboxError(PeerError):
    """The sandbox itself could not be set up or talked to (not a task failure)."""


class UnsafeResultError(PeerError):
    """A result from an untrusted peer would have to be unpickled, so it is refused.

    Raised, naming the type, for a result that could not travel as data (the sandbox
    then pickles it), and for any bare pickle; only a requester that trusts its
    peers (``Pool(trust_results=True)``) unpickles them.
    """


class DataError(ProtocolError):
    """A result is not valid data (`peer.datacodec`): malformed, over one of the
    decoder's bounds, or naming a class the requester does not have."""


class RemoteTraceback(Exception):
    """The formatted traceback of an exception raised on a peer, attached as the
    ``__cause__`` of the exception rebuilt here (as `ProcessPoolExecutor` does)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{with_local_source(self.text).rstrip()}\n"""'


_FRAME_LINE = re.compile(r'^  File "(?P<file>[^"]+)", line (?P<line>\d+), in ')


def with_local_source(traceback_text: str) -> str:
    """Fill in source lines a remote traceback lacks, from this process's own files.

    A sandbox sees none of the requester's files, so frames of functions sent by
    value come back without their source line. Where the requester has the file,
    the line is shown as a local traceback would. Only for display in the process
    that holds the files: a peer must never do this for a requester's traceback
    (it names files the requester chose).
    """
    lines = traceback_text.splitlines()
    out: list[str] = []
    for index, line in enumerate(lines):
        out.append(line)
        match = _FRAME_LINE.match(line)
        following = lines[index + 1] if index + 1 < len(lines) else ""
        if match and not following.startswith("    "):
            source = linecache.getline(match["file"], int(match["line"])).strip()
            if source:
                out.append(f"    {source}")
    return "\n".join(out) + ("\n" if traceback_text.endswith("\n") else "")
