"""The sandbox child: a freshly exec'd interpreter that confines itself, then serves tasks.

This is the child-side half of `peer.sandbox` (which holds the parent side, `Slot`).
The daemon never forks itself into a sandbox: a fork would carry the daemon's whole
memory (its TLS private key inside OpenSSL, tokens, other sessions' code and data) into
the task's reach. It execs ``python -I`` on this module's `main` instead, so the child
starts from a clean address space, and hands it only a socket and a JSON spec.

Three processes make one sandbox:

- the *launcher* (the exec'd process, the daemon's child) imports what tasks commonly
  need, unshares user (when not root), mount, pid, network, IPC and UTS namespaces,
  forks the init and waits for it, then ends the way the server ended;
- the *init* (pid 1 of the new pid namespace) builds the filesystem view
  (`peer.jail`), forks the server and reaps every orphan a task leaves; when it exits
  the kernel kills everything else in the namespace, so nothing a task starts outlives
  its sandbox, and a parent-death signal chains the daemon's death down to it;
- the *server* sets rlimits, drops to the slot's uid (root) or drops all capabilities
  (user namespace), sets no-new-privileges, closes every other descriptor, and serves
  FUNC/TASK frames. Unpickling happens here and nowhere else on a peer.

A layer the kernel refuses is not fatal: the child reports which layers hold, and the
daemon says so at start-up and in ``status``.
"""

from __future__ import annotations

import ctypes
import faulthandler
import gc
import importlib
import json
import os
import resource
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from peer import codec, jail, tracked, wire
from peer.errors import ConnectionClosed, SandboxError
from peer.limits import Limits
from peer.wire import Kind

PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
PR_SET_NO_NEW_PRIVS = 38
PR_SET_CHILD_SUBREAPER = 36
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
#: noroot, no-setuid-fixup, keep-caps off and no ambient raise, each locked: a uid 0
#: inside a user namespace gains nothing from exec or setuid.
_SECUREBITS = 0xEF
_CAPS_VERSION_3 = 0x20080522
#: Layers in the order they are reported. "identity" is a uid of the slot's own (root)
#: or a user namespace holding no capability outside (not root).
LAYERS = ("identity", "mount", "pid", "net", "ipc")

#: A RESULT's first buffer: the child's CPU seconds so far, and whether to recycle it.
META = struct.Struct("!d?")
_STATUS = struct.Struct("!i")
_DIRTY_ERRORS = (MemoryError, RecursionError, SystemError)
#: Exit status of a launcher or init that could not set the sandbox up.
SETUP_FAILED = 70

#: What the parent runs: a fresh, isolated interpreter (no PYTHON* variables, no user
#: site, no current directory on the path) that imports the ``peer`` package from the
#: directory given, then `main` with the socket's descriptor number. The spec comes
#: as the first frame on the socket, not on the command line, which others can read.
BOOTSTRAP = (
    "import sys; sys.path.insert(0, sys.argv[1]); from peer.confine import main; main(int(sys.argv[2]))"
)


@dataclass(frozen=True)
class ChildSpec:
    """Everything the exec'd child needs, sent as the first frame on its socket.

    Attributes:
        fd: The child's end of the socket pair, passed by number.
        parent: The daemon's pid, to notice it died during start-up.
        limits: The slot's resource limits.
        uid: The slot's uid when the daemon is root, else None (a user namespace).
        view: The filesystem view to build.
        preload: Modules to import before forking init and server, so each fork shares them.
    """

    fd: int
    parent: int
    limits: Limits
    uid: int | None
    view: jail.View
    preload: Sequence[str]

    def to_json(self) -> str:
        return json.dumps(
            {
                "fd": self.fd,
                "parent": self.parent,
                "limits": self.limits.to_json(),
                "uid": self.uid,
                "view": self.view.to_json(),
                "preload": list(self.preload),
            }
        )

    @classmethod
    def from_json(cls, raw: str) -> ChildSpec:
        data = json.loads(raw)
        return cls(
            fd=int(data["fd"]),
            parent=int(data["parent"]),
            limits=Limits(**data["limits"]),
            uid=None if data["uid"] is None else int(data["uid"]),
            view=jail.View.from_json(data["view"]),
            preload=tuple(data["preload"]),
        )


def preload_modules(names: Sequence[str]) -> None:
    """Import ``names``, skipping missing ones: imported once in the launcher, they are
    shared by the init and the server it forks, and cost a task nothing."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def main(fd: int) -> None:
    """The launcher: confine what can be confined before forking, fork the init, wait."""
    sock = socket.socket(fileno=fd)
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        kind, payload = wire.read_frame(sock, 1024**2)
        if kind is not Kind.HELLO:
            raise SandboxError(f"expected the spec, got {kind.name}")
        spec = ChildSpec.from_json(bytes(payload).decode())
        prctl(libc, PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != spec.parent:
            os._exit(SETUP_FAILED)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        faulthandler.disable()
        preload_modules(spec.preload)
        layers = unshare_layers(libc, spec.uid)
        alive_r, alive_w = os.pipe()
        status_r, status_w = os.pipe()
        init = os.fork()
        if init == 0:  # pragma: no cover - the init process
            os.close(alive_w)
            os.close(status_r)
            _init(sock, spec, layers, alive_r, status_w)
        os.close(alive_r)
        os.close(status_w)
        sock.close()
    except BaseException as exc:
        _refuse(sock, exc)
        os._exit(SETUP_FAILED)
    os.waitpid(init, 0)
    raw = os.read(status_r, _STATUS.size)
    if len(raw) != _STATUS.size:
        os._exit(SETUP_FAILED)
    _end_like(_STATUS.unpack(raw)[0])


def _init(sock: socket.socket, spec: ChildSpec, layers: dict[str, str], alive: int, status_w: int) -> None:
    """Pid 1 of the sandbox: build its filesystem view, fork the server, reap orphans."""
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        prctl(libc, PR_SET_PDEATHSIG, signal.SIGKILL)
        if select.select([alive], [], [], 0)[0]:  # the launcher died before we could notice
            os._exit(SETUP_FAILED)
        prctl(libc, PR_SET_CHILD_SUBREAPER, 1)  # orphans come here even without a pid namespace
        if layers["mount"] == "":
            try:
                jail.enter(spec.view, own_proc=layers["pid"] == "")
            except OSError as exc:
                layers["mount"] = str(exc)
        server = os.fork()
        if server == 0:  # pragma: no cover - the server process
            os.close(alive)
            os.close(status_w)
            _server(sock, spec, layers)
            os._exit(0)
        sock.close()
    except BaseException as exc:
        _refuse(sock, exc)
        os._exit(SETUP_FAILED)
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(SETUP_FAILED)
        if pid == server:
            os.write(status_w, _STATUS.pack(status))
            os._exit(0)  # as pid 1, this kills whatever the task left running


def _end_like(status: int) -> None:
    """End this process as the server ended, so the daemon reports the real cause."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):  # those cannot be caught anyway
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
        os.kill(os.getpid(), sig)
        time.sleep(1)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else SETUP_FAILED)


def _refuse(sock: socket.socket, exc: BaseException) -> None:
    reason = f"sandbox setup failed: {type(exc).__name__}: {exc}"
    try:
        wire.write_frame(sock, Kind.REFUSE, [wire.encode_json({"reason": reason})])
    except OSError:
        pass


def unshare_layers(libc: ctypes.CDLL, uid: int | None) -> dict[str, str]:
    """Enter new namespaces; return each layer's state: "" when it holds, else why not.

    As root all of them in one call. Without root a user namespace comes first (it
    grants the capabilities the others need inside it), mapping only our own uid and
    gid, so the task keeps the contributor's unprivileged identity outside.
    """
    layers = dict.fromkeys(LAYERS, "")
    wanted = {
        "mount": CLONE_NEWNS,
        "pid": CLONE_NEWPID,
        "net": CLONE_NEWNET,
        "ipc": CLONE_NEWIPC | CLONE_NEWUTS,
    }
    if os.geteuid() == 0:
        if uid is None:
            layers["identity"] = "root without a slot uid: tasks would run as root"
    else:
        real_uid, real_gid = os.getuid(), os.getgid()
        if libc.unshare(CLONE_NEWUSER) != 0:
            error = os.strerror(ctypes.get_errno())
            layers["identity"] = f"no user namespace (unshare(CLONE_NEWUSER): {error})"
        else:
            _write_file("/proc/self/setgroups", "deny")
            _write_file("/proc/self/uid_map", f"{real_uid} {real_uid} 1")
            _write_file("/proc/self/gid_map", f"{real_gid} {real_gid} 1")
    flags = 0
    for flag in wanted.values():
        flags |= flag
    if libc.unshare(flags) == 0:
        return layers
    for name, flag in wanted.items():
        if libc.unshare(flag) != 0:
            layers[name] = f"unshare: {os.strerror(ctypes.get_errno())}"
    return layers


def _write_file(path: str, text: str) -> None:
    with open(path, "w") as out:
        out.write(text)


def _server(sock: socket.socket, spec: ChildSpec, layers: dict[str, str]) -> None:
    """Set limits and drop privileges, report readiness, then serve tasks."""
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        _confine(libc, sock, spec, layers)
    except BaseException as exc:
        _refuse(sock, exc)
        return
    ready = {"uid": os.getuid(), "layers": layers, "network_isolated": layers["net"] == ""}
    wire.write_frame(sock, Kind.HELLO_OK, [wire.encode_json(ready)])
    _serve(sock)


def _confine(libc: ctypes.CDLL, sock: socket.socket, spec: ChildSpec, layers: dict[str, str]) -> None:
    """Rlimits, working directory, identity, no new privileges, no other descriptors."""
    limits = spec.limits
    mapped = address_space()
    if limits.memory <= mapped:
        raise SandboxError(
            f"Limits.memory of {limits.memory} bytes is below the {mapped} bytes "
            "the sandbox interpreter already maps; raise it"
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
    os.chdir(jail.SCRATCH if layers["mount"] == "" else spec.view.scratch)
    os.environ["HOME"] = os.getcwd()
    _drop_bounding_set(libc)
    try:
        prctl(libc, PR_SET_SECUREBITS, _SECUREBITS)
    except PermissionError:
        pass  # no CAP_SETPCAP: neither root nor a user namespace, so nothing to regain
    if spec.uid is not None and os.geteuid() == 0:
        os.setgroups([])
        os.setgid(spec.uid)
        os.setuid(spec.uid)
    _clear_capabilities(libc)
    prctl(libc, PR_SET_NO_NEW_PRIVS, 1)
    keep = sock.fileno()
    _redirect_stdio(keep)
    os.closerange(3, keep)
    os.closerange(keep + 1, max(fd_ceiling, keep + 2))
    gc.freeze()  # preloaded objects stay out of collections and copy-on-write faults


def _drop_bounding_set(libc: ctypes.CDLL) -> None:
    """Remove every capability from the bounding set: nothing exec'd can regain one."""
    for cap in range(64):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            return  # EINVAL past the last capability the kernel knows


def _clear_capabilities(libc: ctypes.CDLL) -> None:
    """Empty the effective, permitted and inheritable sets (capset, version 3)."""
    header = (ctypes.c_uint32 * 2)(_CAPS_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()
    if libc.capset(header, data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


def address_space() -> int:
    """Bytes of address space this process maps now (what RLIMIT_AS counts)."""
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[0]) * resource.getpagesize()


def prctl(libc: ctypes.CDLL, option: int, value: int) -> None:
    if libc.prctl(option, value, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


def _redirect_stdio(keep: int) -> None:
    """Point fds 0-2 and sys.std* at /dev/null: task output must not reach the daemon's.

    ``keep`` is spared in case the socket landed on one of those numbers.
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
