"""Exceptions raised by the peer package.

Everything the peer and the requester library raise on purpose derives from
`PeerError`, so callers can catch the package's failures in one place while
programming errors (TypeError, KeyError, ...) still surface as themselves.
"""

from __future__ import annotations

import linecache
import re
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
    requester must not unpickle objects chosen by a peer, and the remote exception
    class may not even exist locally.

    Attributes:
        type_name: Name of the remote exception type, e.g. ``"ZeroDivisionError"``,
            or a sandbox-level cause such as ``"TimeoutError"`` or ``"SandboxDied"``.
        message: ``str()`` of the remote exception, or a description of the cause.
        traceback_text: The formatted remote traceback; empty when there is none
            (a task killed from outside has no Python traceback).
    """

    def __init__(self, type_name: str, message: str, traceback_text: str = "") -> None:
        super().__init__(type_name, message, traceback_text)
        self.type_name = type_name
        self.message = message
        self.traceback_text = traceback_text

    def __str__(self) -> str:
        head = f"{self.type_name}: {self.message}"
        if not self.traceback_text:
            return head
        return f"{head}\n\nRemote traceback:\n{with_local_source(self.traceback_text).rstrip()}"

    def to_dict(self) -> dict[str, str]:
        """Return the JSON-ready form used on the wire (see `codec.format_exception`)."""
        return {
            "type": self.type_name,
            "message": self.message,
            "traceback": self.traceback_text,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskError:
        """Build a TaskError from a decoded ERROR message, tolerating missing keys.

        The dict comes from another process, so every field is coerced to ``str``
        rather than trusted to have the right type.
        """
        return cls(
            str(data.get("type", "RemoteError")),
            str(data.get("message", "")),
            str(data.get("traceback", "")),
        )


class SandboxError(PeerError):
    """The sandbox itself could not be set up or talked to (not a task failure)."""


class UnsafeResultError(PeerError):
    """The default (data-only) decoder refused a pickle.

    Raised when a result references a global outside the allow-list, or was encoded
    with dill, which can only be loaded by a requester that trusts the peer.
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
