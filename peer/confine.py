"""The sandbox child: how a freshly forked process confines itself, then serves tasks.

This is the child-side half of `peer.sandbox` (which holds the parent side, `Slot`):
everything here runs in the forked process, first as root (new session, parent-death
signal, no network, rlimits, an unprivileged uid, no new privileges, no inherited fds,
a scratch directory; the order follows NOTES), then as the task runner that loads the
requester's code and data. Unpickling happens here and nowhere else on a peer.
"""

from __future__ import annotations

import ctypes
import faulthandler
import gc
import importlib
import os
import resource
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peer import codec, tracked, wire
from peer.errors import ConnectionClosed, SandboxError
from peer.wire import Kind

if TYPE_CHECKING:
    from peer.sandbox import Limits

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
PR_SET_CHILD_SUBREAPER = 36
CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000

#: A RESULT's first buffer: the child's CPU seconds so far, and whether to recycle it.
META = struct.Struct("!d?")
_DIRTY_ERRORS = (MemoryError, RecursionError, SystemError)


@dataclass(frozen=True)
class ChildSpec:
    """What a child needs to confine itself (the parts of its `Slot`)."""

    limits: Limits
    scratch: Path
    uid: int | None
    preload: Sequence[str]


def preload_modules(names: Sequence[str]) -> None:
    """Import ``names``, skipping missing ones, so tasks can use them after privileges drop.

    The daemon calls this once before forking so each new child starts with the
    modules already in memory (the import then costs nothing in the child).
    """
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def child_main(sock: socket.socket, parent_pid: int, slot: ChildSpec) -> None:
    """Confine this freshly forked process, report readiness, then serve tasks."""
    try:
        isolated = _confine(sock, parent_pid, slot)
    except BaseException as exc:
        reason = f"sandbox setup failed: {type(exc).__name__}: {exc}"
        wire.write_frame(sock, Kind.REFUSE, [wire.encode_json({"reason": reason})])
        return
    ready = {"pid": os.getpid(), "uid": os.getuid(), "network_isolated": isolated}
    wire.write_frame(sock, Kind.HELLO_OK, [wire.encode_json(ready)])
    _serve(sock)


def _confine(sock: socket.socket, parent_pid: int, slot: ChildSpec) -> bool:
    """Apply the sandbox, in the order that works (see NOTES); return if network is cut."""
    libc = ctypes.CDLL(None, use_errno=True)
    os.setsid()  # own process group: one killpg reaches everything the task starts
    prctl(libc, PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        raise SandboxError("parent exited during sandbox start")
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    faulthandler.disable()  # its file may be an fd we are about to close
    preload_modules(slot.preload)
    isolated = _unshare_network(libc)
    limits = slot.limits
    mapped = address_space()
    if limits.memory <= mapped:
        raise SandboxError(
            f"Limits.memory of {limits.memory} bytes is below the {mapped} bytes "
            "the forked daemon already maps; raise it"
        )
    fd_ceiling = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    for which, value, hard in (
        (resource.RLIMIT_AS, limits.memory, limits.memory),
        (resource.RLIMIT_CPU, limits.cpu_seconds, limits.cpu_seconds + 1),
        (resource.RLIMIT_NOFILE, limits.nofile, limits.nofile),
        (resource.RLIMIT_FSIZE, limits.fsize, limits.fsize),
        (resource.RLIMIT_NPROC, limits.nproc, limits.nproc),
        (resource.RLIMIT_CORE, 0, 0),
    ):
        resource.setrlimit(which, (value, hard))
    # chdir while still root: the scratch root may not be traversable by the slot uid.
    os.chdir(slot.scratch)
    if slot.uid is not None:
        os.setgroups([])
        os.setgid(slot.uid)
        os.setuid(slot.uid)
    prctl(libc, PR_SET_NO_NEW_PRIVS, 1)
    keep = sock.fileno()
    _redirect_stdio(keep)
    os.closerange(3, keep)
    os.closerange(keep + 1, max(fd_ceiling, keep + 2))
    gc.freeze()  # inherited objects stay out of collections and copy-on-write faults
    return isolated


def address_space() -> int:
    """Bytes of address space this process maps now (what RLIMIT_AS counts)."""
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[0]) * resource.getpagesize()


def prctl(libc: ctypes.CDLL, option: int, value: int) -> None:
    if libc.prctl(option, value, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


def _unshare_network(libc: ctypes.CDLL) -> bool:
    """Move into an empty network namespace; False when the OS does not allow it.

    Root can do it directly; others need a user namespace too. Filesystem unix
    sockets still work inside a network namespace.
    """
    if os.geteuid() == 0 and libc.unshare(CLONE_NEWNET) == 0:
        return True
    return libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0


def _redirect_stdio(keep: int) -> None:
    """Point fds 0-2 and sys.std* at /dev/null: task output must not reach the daemon's.

    ``keep`` is spared in case the daemon started with stdio closed and the socket
    landed on one of those numbers.
    """
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        if fd != keep:
            os.dup2(null, fd)
    os.close(null)
    sys.stdin = open(os.devnull)  # kept open for the life of the process
    sys.stdout = sys.stderr = open(os.devnull, "w")


class _Unloadable:
    """Stands in for a function whose code failed to load, to report that per task."""

    def __init__(self, error: dict[str, str]) -> None:
        self.error = error


class _Forks:
    """Notes whether the running task forked, so its leftover processes get killed."""

    def __init__(self) -> None:
        self.seen = False

    def note(self) -> None:
        self.seen = True


def _serve(sock: socket.socket) -> None:
    """Answer FUNC, TASK, SHARE and DELTA frames until the parent closes the socket or says BYE.

    Functions stay cached for the child's life; the parent bounds how many it sends.
    SHARE/DELTA update the replicas of shared objects (`peer.tracked`) and get no
    reply; one that fails to apply makes the next task's reply ask for recycling.
    """
    forks = _Forks()
    # A task's children must not keep our socket open (the parent waits for EOF),
    # and forking marks this child for recycling so leftovers get killed.
    os.register_at_fork(after_in_parent=forks.note, after_in_child=sock.close)
    functions: dict[str, Callable[..., Any] | _Unloadable] = {}
    doubtful = False
    while True:
        try:
            kind, payload = wire.read_frame(sock)
        except ConnectionClosed:
            return
        if kind is Kind.BYE:
            return
        if kind is Kind.SHARE or kind is Kind.DELTA:
            doubtful |= not tracked.apply_frame(kind, payload)
            del payload
            continue
        parts = wire.unpack_buffers(payload)
        name = bytes(parts[0]).decode()
        if kind is Kind.FUNC:
            try:
                functions[name] = codec.loads_code(parts[1])
            except BaseException as exc:
                functions[name] = _Unloadable(codec.format_exception(exc))
        elif kind is Kind.TASK:
            _run_task(sock, functions.get(name), parts[1:], forks, doubtful)
            forks.seen = doubtful = False
        del payload, parts


def _run_task(
    sock: socket.socket,
    fn: Callable[..., Any] | _Unloadable | None,
    data: list[memoryview],
    forks: _Forks,
    doubtful: bool = False,
) -> None:
    """Run one task and answer RESULT or ERROR, which says whether to recycle us.

    ``doubtful``: a shared-object update failed to apply before this task, so a fresh
    child (which starts from a snapshot) should take over.
    """
    dirty = doubtful
    try:
        if fn is None:
            raise LookupError("no function was sent for this task")
        if isinstance(fn, _Unloadable):
            error = fn.error
        else:
            args, kwargs = codec.loads_data(data, trusted=True)
            out = codec.dumps_result(fn(*args, **kwargs))
            meta = META.pack(time.process_time(), forks.seen or doubtful)
            wire.write_frame(sock, Kind.RESULT, wire.pack_buffers([meta, *out]))
            return
    except BaseException as exc:
        # Anything beyond an ordinary exception may have left this interpreter unwell.
        dirty = doubtful or isinstance(exc, _DIRTY_ERRORS) or not isinstance(exc, Exception)
        try:
            error = codec.format_exception(exc)
        except BaseException:
            error = {"type": type(exc).__name__, "message": "", "traceback": ""}
    reply = {**error, "dirty": dirty or forks.seen, "cpu": time.process_time()}
    wire.write_frame(sock, Kind.ERROR, [wire.encode_json(reply)])
