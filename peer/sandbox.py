"""Run tasks in pre-started, sandboxed child processes, never in the daemon.

(The parent side; what the child does to confine itself and serve is `peer.confine`,
its filesystem view `peer.jail`.)

A `Slot` owns one serving child and one warm spare. Each child is a fresh interpreter
started by exec (``python -I``), never a fork of the daemon, so nothing of the daemon's
memory (its TLS key, tokens, other sessions' code and data) is there to read. It
confines itself (namespaces, a filesystem view of read-only system files and private
empty /tmp, /var/tmp, /dev/shm and /run, rlimits, its own uid, no capabilities, no new
privileges, no inherited fds) and serves tasks over a socketpair using the frames of
`peer.wire`. Reusing the child within a session keeps a trivial task at a fraction of
a millisecond; starting an interpreter costs about 0.25 s, so the spare is started
ahead and takes over at once when the child must go (a new session, a crash, a
doubtful state), while the next spare starts in the background.

When a task hangs, crashes the interpreter or leaves the child in a doubtful state
(MemoryError, processes forked), the parent kills the child's pid namespace (its init
takes every process with it), reports a `TaskError` naming the cause, and promotes the
spare, so the slot keeps serving. The parent never unpickles anything: it forwards the
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
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import peer
from peer import confine, jail, tracked, wire
from peer.errors import ConnectionClosed, ProtocolError, SandboxError, TaskError
from peer.limits import Limits
from peer.wire import Buffer, Kind

__all__ = ["DEFAULT_BASE_UID", "PRELOAD", "Limits", "Slot"]

DEFAULT_BASE_UID = 61000
# Imported once in each child's launcher, before it forks the server, so a task's
# first use of them costs nothing. dill brings the modules pickled functions refer to.
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
_SOCKET_BUFFER = 4 * 1024 * 1024
#: The whole environment of a sandbox child: nothing of the daemon's (tokens, paths).
#: One BLAS thread: a slot is one core's worth of work.
CHILD_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "HOME": jail.SCRATCH,
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


@dataclass
class _Child:
    """The parent's view of one running child process."""

    pid: int  # the launcher, our child
    sock: socket.socket
    pidfd: int | None
    poller: select.poll
    home: Path  # its scratch and root mount point, removed when it is gone
    init_pidfd: int | None = None  # the init of its pid namespace: killing it ends all
    ready: bool = False
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
    when the spawning thread exits. Not thread-safe.

    Args:
        limits: Resource limits for the child.
        index: Slot number; picks the child's uid (``base_uid + index``) and scratch
            directory, so slots never share RLIMIT_NPROC accounting or files.
        scratch_root: Directory under which ``slot-<index>`` holds the children's
            scratch directories, each removed when its child goes.
        base_uid: First uid used for sandboxes when running as root.
        preload: Modules each child imports before it serves.
        max_frame: Largest result frame accepted from the child.
        hide: Host directories the sandbox must not see even if they lie inside a
            shown path (the peer's home, with its key and token).
        spare: Keep a warm spare child, so that replacing the child never waits for an
            interpreter to start.
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
        hide: Sequence[Path] = (),
        spare: bool = True,
    ) -> None:
        self.limits = limits
        self.index = index
        self.scratch = Path(scratch_root) / f"slot-{index}"
        self.uid: int | None = base_uid + index if os.geteuid() == 0 else None
        self.network_isolated = False
        #: Each confinement layer (`confine.LAYERS`): "" when it holds, else why not.
        self.layers: dict[str, str] = {}
        self.max_frame = max_frame
        self._preload = tuple(preload)
        self._codes: OrderedDict[str, bytes] = OrderedDict()
        self._child: _Child | None = None
        self._spare: _Child | None = None
        self._dying: list[tuple[_Child, bool]] = []
        self._serial = 0
        package = os.path.dirname(os.path.abspath(peer.__file__))
        self._package_parent = os.path.dirname(package)
        self._show = jail.interpreter_paths(package)
        self._hide = jail.hidden_paths([*hide, self.scratch.parent])
        if self.uid is not None:
            # A daemon that was SIGKILLed may have left processes under this uid (only
            # without a pid namespace); they must not meet the next requester's files.
            _kill_uid(self.uid)
            # Orphans of a task are re-parented to us instead of PID 1, so we can
            # reap them: unreaped zombies still count against RLIMIT_NPROC.
            confine.prctl(ctypes.CDLL(None, use_errno=True), confine.PR_SET_CHILD_SUBREAPER, 1)
            _reap_uid(self.uid)
        shutil.rmtree(self.scratch, ignore_errors=True)
        self._child = self._ready(self._spawn())
        # Without a pid namespace a child is stopped by killing its uid, which would
        # take a spare of the same uid with it.
        self._want_spare = spare and (self.uid is None or self.layers.get("pid") == "")
        self._refill()

    @property
    def pid(self) -> int | None:
        """Process id of the current child (its launcher), or None between children."""
        return self._child.pid if self._child else None

    @property
    def shown_paths(self) -> tuple[str, ...]:
        """Host paths the sandbox sees read-only (besides the system directories)."""
        return self._show

    @property
    def work_dir(self) -> Path | None:
        """Host path of the current child's scratch directory (its ``/scratch``)."""
        return self._child.home / "work" if self._child else None

    def server_pids(self) -> list[int]:
        """Host pids of the serving processes of the child and the spare (for checks).

        Each sandbox's server is pid 2 of its pid namespace, found among the
        descendants of its launcher.
        """
        pids = []
        for child in (self._child, self._spare):
            if child is not None and child.ready:
                pids += [pid for pid in _descendants(child.pid) if _namespace_pid(pid) == 2]
        return sorted(pids)

    def missing_layers(self) -> dict[str, str]:
        """The confinement layers that do not hold here, with the reason for each."""
        return {name: why for name, why in self.layers.items() if why}

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
            `codec.dumps_result(result)` buffers, slicing the received frame.

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
        """Replace the child with the warm spare (a fresh interpreter, fresh scratch).

        The daemon calls this before a task of another session than the last one: a
        task can leave state behind (patched modules, globals, files, processes) that
        another requester's tasks must never see or be affected by.
        """
        if self._child is not None:
            self._replace(self._child)

    def close(self) -> None:
        """Kill the children and everything they started; the slot cannot be used after."""
        children = [c for c in (self._child, self._spare) if c is not None]
        self._child = self._spare = None
        for child in children:
            self._stop(child, wait=False)
        self._reap_dying()
        shutil.rmtree(self.scratch, ignore_errors=True)

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
        """Return a running child, promoting the spare if the last one is gone."""
        child = self._child
        if child is not None and child.ended() is not None:
            # It died between tasks (e.g. killed from outside); start afresh.
            self._child = None
            self._stop(child)
            child = None
        if child is None:
            child = self._child = self._next_child()
        return child

    def _next_child(self) -> _Child:
        """The spare once it is ready (or a new child if there is none); a new spare starts behind it."""
        spare, self._spare = self._spare, None
        if spare is not None and spare.ended() is not None:  # it died while waiting
            self._stop(spare)
            spare = None
        try:
            return self._ready(spare if spare is not None else self._spawn())
        finally:
            self._refill()

    def _refill(self) -> None:
        """Start a spare in the background if one is wanted and there is none."""
        self._reap_dying(block=False)
        if self._want_spare and self._spare is None:
            try:
                self._spare = self._spawn()
            except SandboxError:
                pass  # the next promotion starts one synchronously and reports why

    def _replace(self, child: _Child, exc: BaseException | None = None) -> str:
        """Stop ``child`` and promote the spare; return why the old one went away.

        After a broken connection the child has usually died on its own, so we wait a
        moment for its exit status; after garbage from a live child we barely wait.
        """
        broken = isinstance(exc, (ConnectionClosed, OSError)) and not isinstance(exc, TimeoutError)
        grace = _EXIT_GRACE if broken else 0.2 if exc is not None else 0.0
        self._child = None
        cause = self._stop(child, grace=grace, wait=False)
        if exc is not None and not broken:
            cause = f"{exc}; {cause}"
        try:
            self._child = self._next_child()
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
        """Start a fresh sandbox interpreter; it confines itself and then says HELLO_OK.

        Returns at once (the child is not ready yet: see `_ready`), so a spare's
        start-up overlaps the tasks the current child runs.
        """
        self._serial += 1
        home = self.scratch / f"child-{self._serial}"
        work, root = home / "work", home / "root"
        try:
            shutil.rmtree(home, ignore_errors=True)
            self.scratch.mkdir(mode=0o700, parents=True, exist_ok=True)
            for directory in (home, work, root):
                directory.mkdir(mode=0o700)
            if self.uid is not None:
                os.chown(work, self.uid, self.uid)
        except OSError as exc:
            raise SandboxError(f"cannot prepare scratch directory {home}: {exc}") from exc
        ours, theirs = socket.socketpair()
        for end in (ours, theirs):
            # Bigger buffers: a 100 MB argument crosses in fewer wake-ups of either side.
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
            end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
        try:
            view = jail.View(
                root=str(root),
                scratch=str(work),
                show=self._show,
                hide=self._hide,
                tmp_bytes=self.limits.tmp_bytes,
                uid=os.getuid() if self.uid is None else self.uid,
            )
            spec = confine.ChildSpec(theirs.fileno(), os.getpid(), self.limits, self.uid, view, self._preload)
            argv = [sys.executable, "-I", "-c", confine.BOOTSTRAP, self._package_parent, str(theirs.fileno())]
            os.set_inheritable(theirs.fileno(), True)
            pid = os.posix_spawn(sys.executable, argv, CHILD_ENV, setsid=True)
            wire.write_frame(ours, Kind.HELLO, [spec.to_json().encode()])
        except OSError as exc:
            ours.close()
            raise SandboxError(f"cannot start a sandbox interpreter {sys.executable}: {exc}") from exc
        finally:
            theirs.close()
        try:
            pidfd: int | None = os.pidfd_open(pid)
        except (AttributeError, OSError):
            pidfd = None
        poller = select.poll()
        for fd in (ours.fileno(), pidfd):
            if fd is not None:
                poller.register(fd, select.POLLIN)
        return _Child(pid, ours, pidfd, poller, home)

    def _ready(self, child: _Child) -> _Child:
        """Wait for a started child's HELLO_OK and note which confinement layers hold."""
        if child.ready:
            return child
        try:
            kind, payload = self._await_frame(child, time.monotonic() + _START_TIMEOUT)
            info = wire.decode_json(payload)
        except (ProtocolError, OSError) as exc:
            grace = 0.0 if isinstance(exc, TimeoutError) else _EXIT_GRACE
            cause = self._stop(child, grace=grace)
            raise SandboxError(f"sandbox child failed to start: {exc!r}; {cause}") from exc
        if kind is not Kind.HELLO_OK:
            self._stop(child, grace=_EXIT_GRACE)
            raise SandboxError(str(info.get("reason", f"sandbox sent {kind.name} at start")))
        layers = info.get("layers")
        if isinstance(layers, dict):
            self.layers = {str(k): str(v) for k, v in layers.items() if k in confine.LAYERS}
        self.network_isolated = bool(info.get("network_isolated"))
        child.init_pidfd = _init_pidfd(child.pid) if self.layers.get("pid") == "" else None
        child.ready = True
        return child

    def _stop(self, child: _Child, *, grace: float = 0.0, wait: bool = True) -> str:
        """Kill ``child`` with everything it started; say how it ended.

        Tearing down a big address space takes the kernel some milliseconds, so with
        ``wait=False`` a child in its own pid namespace is reaped (and its scratch
        removed) later, off the path of the next task. Without a pid namespace the
        slot's uid is swept at once, before another child runs under it.
        """
        by_uid = self.uid is not None and child.init_pidfd is None
        cause = _kill(child, self.uid if by_uid else None, grace=grace)
        self._dying.append((child, by_uid))
        if wait or by_uid:
            self._reap_dying()
        return cause

    def _reap_dying(self, *, block: bool = True) -> None:
        """Reap killed children (only those already gone unless ``block``)."""
        still = []
        for child, by_uid in self._dying:
            gone = child.ended() is not None and (
                child.init_pidfd is None or bool(select.select([child.init_pidfd], [], [], 0)[0])
            )
            if block or gone:
                _reap(child, self.uid if by_uid else None)
                shutil.rmtree(child.home, ignore_errors=True)
            else:
                still.append((child, by_uid))
        self._dying = still


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as children:
                kids = [int(p) for p in children.read().split()]
        except OSError:
            continue
        found += kids
        todo += kids
    return found


def _namespace_pid(pid: int) -> int | None:
    """The pid of ``pid`` in its innermost pid namespace, from /proc's NSpid line."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("NSpid:"):
                    return int(line.split()[-1])
    except (OSError, ValueError):
        pass
    return None


def _init_pidfd(launcher: int) -> int | None:
    """A pidfd of the launcher's one child, the init of the sandbox's pid namespace.

    Signalling it through a pidfd cannot hit another process that reused the pid.
    """
    try:
        with open(f"/proc/{launcher}/task/{launcher}/children") as children:
            pids = children.read().split()
        return os.pidfd_open(int(pids[0])) if len(pids) == 1 else None
    except (OSError, ValueError):
        return None


def _kill(child: _Child, uid: int | None, *, grace: float = 0.0) -> str:
    """Kill the child's pid namespace, its launcher and process group; say how it ended.

    Killing the namespace's init ends every process in it, wherever a task moved
    them in the process tree. Without a pid namespace, ``uid`` (as root) names the
    processes to kill instead. When the child is believed to be exiting on its own,
    ``grace`` gives it a moment to finish dying so its real exit status, not our
    SIGKILL, is reported.
    """
    if grace > 0:
        _wait_for_exit(child, grace)
    ended = child.ended()
    if child.init_pidfd is not None:
        try:
            signal.pidfd_send_signal(child.init_pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for kill in (os.killpg, os.kill):
        try:
            kill(child.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if uid is not None:
        _kill_uid(uid)
    child.sock.close()
    return "sandbox was killed" if ended is None else _describe(*ended)


def _reap(child: _Child, uid: int | None) -> None:
    """Wait for a killed child's processes to be gone and release their pids."""
    child.reap()
    if child.init_pidfd is not None:
        _reap_init(child.init_pidfd)
        child.init_pidfd = None
    if uid is not None:
        _reap_uid(uid)
    if child.pidfd is not None:
        os.close(child.pidfd)
        child.pidfd = None


def _reap_init(pidfd: int, within: float = 2.0) -> None:
    """Reap the namespace's init if it was re-parented to us (its launcher died first)."""
    select.select([pidfd], [], [], within)  # readable once it has exited
    try:
        os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)
    except ChildProcessError:
        pass  # the launcher reaped it
    finally:
        os.close(pidfd)


def _wait_for_exit(child: _Child, grace: float) -> None:
    """Block up to ``grace`` seconds until the child process has exited."""
    if child.pidfd is not None:
        select.select([child.pidfd], [], [], grace)
        return
    end = time.monotonic() + grace
    while time.monotonic() < end and child.ended() is None:
        time.sleep(0.005)


def _kill_uid(uid: int, within: float = 2.0) -> None:
    """SIGKILL every process owned by ``uid``, wherever it moved in the process tree.

    Sweeps /proc until a sweep finds nothing new (what is left are the dead, waiting
    to be reaped): a process forked between two sweeps is caught by the next, and
    RLIMIT_NPROC bounds how many there can be. No helper is forked from the daemon,
    whose memory holds its secrets.
    """
    seen: set[int] = set()
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        found = {pid for pid, _ppid in _processes_of(uid)}
        for pid in found - seen:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if found <= seen:
            return
        seen |= found


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
