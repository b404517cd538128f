"""Run tasks in pre-started, sandboxed child processes, never in the daemon.

(The parent side; what the child does to confine itself and serve is `peer.confine`.)

A `Slot` owns one child process at a time. The child is forked once, confines itself
(new session, parent-death signal, no network, rlimits, an unprivileged per-slot uid,
no new privileges, no inherited fds, a scratch directory) and then serves tasks over a
socketpair using the frames of `peer.wire`. Forking once and reusing the child keeps
a trivial task at a fraction of a millisecond, against several milliseconds for a
fork per task.

When a task hangs, crashes the interpreter or leaves the child in a doubtful state
(MemoryError, processes forked), the parent kills the child's process group and every
process of the slot's uid, reports a `TaskError` naming the cause, and forks a fresh
child, so the slot keeps serving. The parent never unpickles anything: it forwards the
requester's buffers in and the child's result buffers out.
"""

from __future__ import annotations

import ctypes
import os
import select
import shutil
import signal
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from peer import confine, tracked, wire
from peer.errors import ConnectionClosed, ProtocolError, SandboxError, TaskError
from peer.wire import Buffer, Kind

DEFAULT_BASE_UID = 61000
# The interpreter may live under a 0700 directory (/root): once the child drops to
# its own uid it can import nothing new, so what tasks commonly need is imported
# before that. dill brings the modules pickled functions refer to by reference.
PRELOAD = (
    "abc array base64 binascii bisect bz2 cmath collections collections.abc contextlib "
    "copy csv ctypes dataclasses datetime decimal dill encodings.idna encodings.latin_1 "
    "enum fractions functools gzip hashlib heapq hmac inspect io itertools json lzma "
    "math numbers numpy operator os pathlib pickle random re secrets socket statistics "
    "string struct tempfile textwrap time traceback typing unicodedata uuid warnings zlib"
).split()

_ERROR_LIMIT = 1024 * 1024
_CODE_CACHE = 256
_START_TIMEOUT = 30.0
_EXIT_GRACE = 2.0
# Failures after which the child's interpreter may be in a bad state.


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandbox child.

    Attributes:
        memory: Address-space limit in bytes (RLIMIT_AS); it must leave room for the
            forked daemon's own mappings.
        cpu_seconds: CPU time limit (RLIMIT_CPU). It accumulates over the child's
            life, so the slot recycles the child once half of it is used.
        nproc: Processes and threads the slot's uid may have (RLIMIT_NPROC).
        nofile: Open file descriptors (RLIMIT_NOFILE).
        fsize: Largest file the task may write, in bytes (RLIMIT_FSIZE).
        timeout: Default wall-clock limit of one task, in seconds.
        max_tasks: Tasks after which the child is replaced by a fresh one.
    """

    memory: int = 2 * 1024**3
    cpu_seconds: int = 300
    nproc: int = 64
    nofile: int = 256
    fsize: int = 1024**3
    timeout: float = 300.0
    max_tasks: int = 10_000

    def __post_init__(self) -> None:
        for name in ("memory", "cpu_seconds", "nproc", "nofile", "fsize", "timeout", "max_tasks"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Limits.{name} must be positive")


@dataclass
class _Child:
    """The parent's view of one running child process."""

    pid: int
    sock: socket.socket
    pidfd: int | None
    poller: select.poll
    codes: set[str] = field(default_factory=set)
    tasks: int = 0
    shared: dict[int, int] = field(default_factory=dict)  # obj_id -> version it holds
    shared_token: int | None = None  # the SharedLog those versions came from
    shared_revision: int = 0  # it holds every update of that log up to this revision

    def ended(self) -> tuple[int, int] | None:
        """Return ``(si_code, si_status)`` if the process has ended, else None.

        Peeks without reaping: until it is reaped the pid (and process group id)
        cannot be reused, so killing the group afterwards cannot hit a stranger.
        """
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # someone else reaped it; how it ended is lost
            return (os.CLD_EXITED, 0)
        return None if info is None else (info.si_code, info.si_status)

    def reap(self) -> None:
        """Wait for the (killed) process to end and release its pid."""
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


class Slot:
    """One job slot: a sandboxed child process that runs tasks one at a time.

    Drive a slot from one long-lived thread: the child's parent-death signal fires
    when the forking thread exits. Not thread-safe.

    Args:
        limits: Resource limits for the child.
        index: Slot number; picks the child's uid (``base_uid + index``) and scratch
            directory, so slots never share RLIMIT_NPROC accounting or files.
        scratch_root: Directory under which ``slot-<index>`` is the child's working
            directory, wiped whenever a fresh child starts.
        base_uid: First uid used for sandboxes when running as root.
        preload: Modules imported before privileges are dropped.
        max_frame: Largest result frame accepted from the child.
    """

    def __init__(
        self,
        limits: Limits,
        index: int,
        scratch_root: Path,
        *,
        base_uid: int = DEFAULT_BASE_UID,
        preload: Sequence[str] = PRELOAD,
        max_frame: int = wire.DEFAULT_MAX_FRAME,
    ) -> None:
        self.limits = limits
        self.index = index
        self.scratch = Path(scratch_root) / f"slot-{index}"
        self.uid: int | None = base_uid + index if os.geteuid() == 0 else None
        self.network_isolated = False
        self.max_frame = max_frame
        self._preload = tuple(preload)
        self._codes: OrderedDict[str, bytes] = OrderedDict()
        self._child: _Child | None = None
        confine.preload_modules(self._preload)
        if self.uid is not None:
            # Orphans of a task (fork bombs) are re-parented to us instead of PID 1,
            # so we can reap them: unreaped zombies still count against RLIMIT_NPROC.
            confine.prctl(ctypes.CDLL(None, use_errno=True), confine.PR_SET_CHILD_SUBREAPER, 1)
        self._child = self._spawn()

    @property
    def pid(self) -> int | None:
        """Process id of the current child, or None between children."""
        return self._child.pid if self._child else None

    def run(
        self,
        code_id: str,
        code: bytes | None,
        data: Sequence[Buffer],
        *,
        timeout: float | None = None,
        shared: tracked.SharedLog | None = None,
        upto: int | None = None,
    ) -> list[memoryview]:
        """Run one task in the child and return its result buffers.

        Args:
            code_id: Cache key of the function (see `codec.code_id`).
            code: The dill-pickled function, or None when this slot was given it
                before. The slot keeps it, so a fresh child is sent it again.
            data: `codec.dumps_data((args, kwargs))` buffers, forwarded unread.
            timeout: Wall-clock limit in seconds; defaults to ``limits.timeout``.
            shared: The session's shared objects. Before the task, the child is sent
                the snapshots and deltas it lacks (a fresh child: the latest snapshot
                and the deltas since), as forwarded buffers. A child holding objects
                of another log (another session) is replaced first, so one session's
                data never reaches another's tasks; pass the session's log on every
                run, even when empty.
            upto: The log's `revision` when the task arrived: the child is brought
                up to that point only, so the task sees the state it was submitted
                with. None brings it fully up to date.

        Returns:
            `codec.dumps_data(result)` buffers, slicing the received frame.

        Raises:
            TaskError: the task raised, timed out or killed its sandbox. The slot
                has already replaced the child when needed.
            SandboxError: no code for ``code_id``, or a fresh child failed to start.
        """
        if code is not None:
            self._codes[code_id] = code
            self._codes.move_to_end(code_id)
            while len(self._codes) > _CODE_CACHE:
                self._codes.popitem(last=False)
        elif code_id not in self._codes:
            raise SandboxError(f"no code was given for id {code_id!r}")
        limit = self.limits.timeout if timeout is None else timeout
        child = self._live_child()
        token = None if shared is None else shared.token
        foreign = child.shared_token is not None and child.shared_token != token
        if foreign or (code_id not in child.codes and len(child.codes) >= _CODE_CACHE):
            # The child keeps every function it loads; bound that by replacing it. It
            # also keeps replicas, which another session's tasks must not see.
            self._replace(child)
            child = self._live_child()
        deadline = time.monotonic() + limit
        try:
            child.sock.settimeout(limit)
            if shared is not None:
                self._sync_shared(child, shared, upto)
            if code_id not in child.codes:
                parts = wire.pack_buffers([code_id.encode(), self._codes[code_id]])
                wire.write_frame(child.sock, Kind.FUNC, parts)
                child.codes.add(code_id)
            wire.write_frame(child.sock, Kind.TASK, wire.pack_buffers([code_id.encode(), *data]))
            kind, payload = self._await_frame(child, deadline)
        except TimeoutError:
            self._replace(child)
            raise TaskError("TimeoutError", f"task exceeded {limit:g} s timeout") from None
        except (ProtocolError, OSError) as exc:
            raise TaskError("SandboxDied", self._replace(child, exc)) from None
        child.tasks += 1
        return self._outcome(child, kind, payload)

    def _sync_shared(self, child: _Child, shared: tracked.SharedLog, upto: int | None) -> None:
        """Send the child the shared-object updates it lacks, up to revision ``upto``.

        The child applies them before it reads the TASK frame that follows, and sends
        nothing back: a failure to apply shows in the tasks that use the object, and
        the child then asks to be recycled. Nothing here is decoded.
        """
        revision = shared.revision if upto is None else min(upto, shared.revision)
        if child.shared_token == shared.token and child.shared_revision >= revision:
            return  # nothing new: the common case costs two comparisons
        for update in shared.needs(child.shared, upto=revision):
            wire.write_frame(child.sock, *tracked.update_frame(update))
            child.shared[update.obj_id] = update.version
            child.shared_token = shared.token
        if child.shared_token == shared.token:
            child.shared_revision = max(child.shared_revision, revision)

    def recycle(self) -> None:
        """Replace the child with a fresh one and wipe the scratch directory.

        The daemon calls this before a task of another session than the last one: a
        task can leave state behind (patched modules, globals, files, processes) that
        another requester's tasks must never see or be affected by.
        """
        if self._child is not None:
            self._replace(self._child)

    def close(self) -> None:
        """Kill the child and everything it started; the slot cannot be used after."""
        if self._child is not None:
            child, self._child = self._child, None
            _stop(child, self.uid)

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _outcome(self, child: _Child, kind: Kind, payload: memoryview) -> list[memoryview]:
        """Turn the child's reply into result buffers or a TaskError, recycling if due."""
        try:
            if kind is Kind.RESULT:
                meta, *result = wire.unpack_buffers(payload)
                cpu, dirty = confine.META.unpack(meta)
                self._recycle_if_due(child, cpu, dirty)
                return result
            if kind is Kind.ERROR:
                info = wire.decode_json(payload, limit=_ERROR_LIMIT)
                # The child runs the requester's code, which can write its own frames:
                # nothing in this message is trusted to have the right type.
                raw_cpu = info.get("cpu", 0.0)
                cpu = float(raw_cpu) if isinstance(raw_cpu, int | float) else float("inf")
                dirty = info.get("dirty", True) is not False
                self._recycle_if_due(child, cpu, dirty)
                raise TaskError.from_dict(info)
            raise ProtocolError(f"sandbox sent an unexpected {kind.name} frame")
        except (ProtocolError, struct.error, ValueError, TypeError, OverflowError) as exc:
            raise TaskError("SandboxDied", self._replace(child, exc)) from None

    def _recycle_if_due(self, child: _Child, cpu: float, dirty: bool) -> None:
        """Replace the child when it is doubtful, old, or near its CPU limit.

        RLIMIT_CPU counts from the child's start, so a long-lived child would leave
        later tasks with less and less CPU; half the limit is the recycling point.
        """
        worn = child.tasks >= self.limits.max_tasks or cpu >= self.limits.cpu_seconds / 2
        if dirty or worn:
            self._replace(child)

    def _live_child(self) -> _Child:
        """Return a running child, starting one if the last one is gone."""
        child = self._child
        if child is not None and child.ended() is not None:
            # It died between tasks (e.g. killed from outside); start afresh.
            self._child = None
            _stop(child, self.uid)
            child = None
        if child is None:
            child = self._child = self._spawn()
        return child

    def _replace(self, child: _Child, exc: BaseException | None = None) -> str:
        """Stop ``child`` and start a fresh one; return why the old one went away.

        After a broken connection the child has usually died on its own, so we wait a
        moment for its exit status; after garbage from a live child we barely wait.
        """
        broken = isinstance(exc, (ConnectionClosed, OSError)) and not isinstance(exc, TimeoutError)
        grace = _EXIT_GRACE if broken else 0.2 if exc is not None else 0.0
        self._child = None
        cause = _stop(child, self.uid, grace=grace)
        if exc is not None and not broken:
            cause = f"{exc}; {cause}"
        try:
            self._child = self._spawn()
        except SandboxError:
            pass  # The next run() retries and reports the failure.
        return cause

    def _await_frame(self, child: _Child, deadline: float) -> tuple[Kind, memoryview]:
        """Wait for the child's reply, noticing its death even if a grandchild holds the socket."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        events = child.poller.poll(remaining * 1000)
        if not events:
            raise TimeoutError
        if all(fd != child.sock.fileno() for fd, _ in events):
            raise ConnectionClosed("sandbox exited")
        child.sock.settimeout(max(deadline - time.monotonic(), 0.001))
        return wire.read_frame(child.sock, self.max_frame)

    def _spawn(self) -> _Child:
        """Fork a child, let it confine itself, and wait for its ready message."""
        try:
            if self.scratch.exists():
                shutil.rmtree(self.scratch)
            self.scratch.mkdir(mode=0o700, parents=True)
            if self.uid is not None:
                os.chown(self.scratch, self.uid, self.uid)
        except OSError as exc:
            raise SandboxError(f"cannot prepare scratch directory {self.scratch}: {exc}") from exc
        ours, theirs = socket.socketpair()
        parent_pid = os.getpid()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, reported over the socket
            status = 70
            try:
                ours.close()
                confine.child_main(
                    theirs, parent_pid, confine.ChildSpec(self.limits, self.scratch, self.uid, self._preload)
                )
                status = 0
            finally:
                os._exit(status)
        theirs.close()
        try:
            pidfd: int | None = os.pidfd_open(pid)
        except (AttributeError, OSError):
            pidfd = None
        poller = select.poll()
        for fd in (ours.fileno(), pidfd):
            if fd is not None:
                poller.register(fd, select.POLLIN)
        child = _Child(pid, ours, pidfd, poller)
        try:
            kind, payload = self._await_frame(child, time.monotonic() + _START_TIMEOUT)
            info = wire.decode_json(payload)
        except (ProtocolError, OSError) as exc:
            grace = 0.0 if isinstance(exc, TimeoutError) else _EXIT_GRACE
            cause = _stop(child, self.uid, grace=grace)
            raise SandboxError(f"sandbox child failed to start: {exc!r}; {cause}") from exc
        if kind is not Kind.HELLO_OK:
            _stop(child, self.uid, grace=_EXIT_GRACE)
            raise SandboxError(str(info.get("reason", f"sandbox sent {kind.name} at start")))
        self.network_isolated = bool(info.get("network_isolated"))
        return child


def _stop(child: _Child, uid: int | None, *, grace: float = 0.0) -> str:
    """Kill the child, its process group and (as root) every process of ``uid``.

    Fork-bomb children escape ``waitpid`` and may leave the group, but not the uid.
    When the child is believed to be exiting on its own, ``grace`` gives it a moment
    to finish dying so its real exit status, not our SIGKILL, is reported.
    """
    if grace > 0:
        _wait_for_exit(child, grace)
    ended = child.ended()
    for kill in (os.killpg, os.kill):
        try:
            kill(child.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if uid is not None:
        _kill_uid(uid)
    child.reap()
    if uid is not None:
        _reap_uid(uid)
    child.sock.close()
    if child.pidfd is not None:
        os.close(child.pidfd)
    return "sandbox was killed" if ended is None else _describe(*ended)


def _wait_for_exit(child: _Child, grace: float) -> None:
    """Block up to ``grace`` seconds until the child process has exited."""
    if child.pidfd is not None:
        select.select([child.pidfd], [], [], grace)
        return
    end = time.monotonic() + grace
    while time.monotonic() < end and child.ended() is None:
        time.sleep(0.005)


def _kill_uid(uid: int) -> None:
    """SIGKILL every process owned by ``uid``, from a helper that takes on that uid.

    ``kill(-1)`` from a process of that uid reaches exactly the processes it may
    signal: those of the same uid, wherever they moved in the process tree.
    """
    pid = os.fork()
    if pid == 0:  # pragma: no cover - helper process
        try:
            os.setgid(uid)
            os.setuid(uid)
            os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _reap_uid(uid: int, within: float = 2.0) -> None:
    """Reap the killed processes of ``uid`` that were re-parented to us.

    A killed process keeps counting against the uid's RLIMIT_NPROC until it is
    reaped, so the next child could not fork if we left them to PID 1 (which may
    be slow, or may be us). Processes that are still someone else's child are
    waited for until their parent dies and they come to us.
    """
    me = os.getpid()
    deadline = time.monotonic() + within
    while True:
        found = _processes_of(uid)
        for pid, ppid in found:
            if ppid == me:
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass
        if not found or time.monotonic() > deadline:
            return
        if all(ppid != me for _, ppid in found):
            time.sleep(0.005)


def _processes_of(uid: int) -> list[tuple[int, int]]:
    """List ``(pid, parent pid)`` of every process, zombies included, of real uid ``uid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status", "rb") as status:
                text = status.read()
        except OSError:
            continue
        ppid = uid_line = None
        for line in text.splitlines():
            if line.startswith(b"PPid:"):
                ppid = int(line.split()[1])
            elif line.startswith(b"Uid:"):
                uid_line = int(line.split()[1])
                break
        if uid_line == uid and ppid is not None:
            found.append((int(entry), ppid))
    return found


def _describe(code: int, value: int) -> str:
    """Say in words how a child process ended, from ``waitid``'s code and status."""
    if code == os.CLD_EXITED:
        return f"sandbox exited with status {value}"
    if value == signal.SIGXCPU:
        return "sandbox exceeded its CPU time limit (SIGXCPU)"
    try:
        name = signal.Signals(value).name
    except ValueError:
        name = f"signal {value}"
    return f"sandbox died with {name}"


# --- The child side -----------------------------------------------------------------
