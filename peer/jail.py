"""The sandbox's view of the filesystem: a new root holding only what a task needs.

A mount namespace alone changes nothing a task can see, and a read-only mount does not
stop ``connect()`` to a unix socket found on it (PostgreSQL's, Redis', the desktop's):
only hiding it does. So the sandbox child builds a fresh root on a small tmpfs, puts in
it read-only bind mounts of the interpreter, its libraries and the system's shared
libraries, its own scratch directory read-write, private size-capped tmpfs for /tmp,
/var/tmp, /run and /dev/shm, a minimal /dev and a fresh /proc, then ``pivot_root``s
into it and detaches the host's tree. The host's home directories, sockets, other
sessions' files and the daemon's keys are simply not there.

Everything here runs in the child, in its new mount namespace, with the capabilities
of (namespace) root and before it drops them; the parent computes the `View` (which
host paths to show) because only it knows where the interpreter and the peer live.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2

#: Where the slot's scratch directory appears inside the sandbox (its working directory).
SCRATCH = "/scratch"
#: System directories shown read-only when they exist (symlinks such as /lib -> usr/lib
#: are recreated as symlinks).
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
#: Files of /etc that libraries read; the rest of /etc (host configuration, perhaps
#: secrets) stays hidden.
ETC_FILES = (
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/nsswitch.conf",
    "/etc/hosts",
    "/etc/protocols",
    "/etc/services",
    "/etc/mime.types",
    "/etc/ssl",
    "/etc/ca-certificates",
)
DEVICES = ("null", "zero", "full", "random", "urandom")
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}


class JailError(OSError):
    """A mount step of the sandbox's filesystem view failed."""


@dataclass(frozen=True)
class View:
    """What the sandbox sees of the host: built by the parent, applied by the child.

    Attributes:
        root: An empty host directory the new root is mounted on (in the child's own
            mount namespace, so the host never sees anything mounted there).
        scratch: The slot's host scratch directory, shown read-write at `SCRATCH`.
        show: Host paths shown read-only at the same place (interpreter, libraries).
        hide: Host paths covered by an empty read-only directory even when they lie
            inside a shown path (the peer's home with its key and token).
        tmp_bytes: Size cap of each private tmpfs (/tmp, /var/tmp, /dev/shm; /run gets
            a small fixed one).
        uid: The uid the task runs as, for the generated /etc/passwd.
    """

    root: str
    scratch: str
    show: tuple[str, ...]
    hide: tuple[str, ...] = ()
    tmp_bytes: int = 64 * 1024**2
    uid: int = 65534

    def to_json(self) -> dict[str, object]:
        return {
            "root": self.root,
            "scratch": self.scratch,
            "show": list(self.show),
            "hide": list(self.hide),
            "tmp_bytes": self.tmp_bytes,
            "uid": self.uid,
        }

    @classmethod
    def from_json(cls, raw: dict[str, object]) -> View:
        show = raw["show"]
        hide = raw.get("hide", [])
        assert isinstance(show, list) and isinstance(hide, list)
        return cls(
            root=str(raw["root"]),
            scratch=str(raw["scratch"]),
            show=tuple(str(p) for p in show),
            hide=tuple(str(p) for p in hide),
            tmp_bytes=int(raw.get("tmp_bytes", 64 * 1024**2)),  # type: ignore[call-overload]
            uid=int(raw.get("uid", 65534)),  # type: ignore[call-overload]
        )


def interpreter_paths(peer_package: str, *, extra: Iterable[str] = ()) -> tuple[str, ...]:
    """Host paths a fresh interpreter needs to import what the daemon could import.

    The prefixes (venv and base installation), the ``peer`` package itself, and the
    ``sys.path`` entries that are package directories (site-packages, dist-packages),
    both as written (a venv reached through a symlink is recreated as that symlink)
    and resolved. Other path entries are not shown: the script's directory or the
    current directory (a home directory, a source checkout with its data) would
    show everything in them; a requester's own modules travel by value anyway.
    Paths inside another shown path, or inside the system directories, are dropped.
    """
    package = os.path.abspath(peer_package)
    checkouts = {os.path.dirname(package), os.path.dirname(os.path.realpath(package))}
    wanted = {package, os.path.realpath(package)}
    packages = [p for p in sys.path if os.path.basename(p.rstrip("/")) in ("site-packages", "dist-packages")]
    candidates = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *packages, *extra]
    candidates += [os.path.dirname(sys.executable)]
    for entry in candidates:
        if not entry:
            continue
        for path in (os.path.abspath(entry), os.path.realpath(entry)):
            if os.path.isdir(path) and path not in checkouts and path != "/":
                wanted.add(path)
    system = {os.path.realpath(d) for d in SYSTEM_DIRS} | set(SYSTEM_DIRS)
    return tuple(p for p in _outermost(wanted) if not any(_within(p, d) for d in system))


def _within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _outermost(paths: Iterable[str]) -> tuple[str, ...]:
    kept: list[str] = []
    for path in sorted(set(paths), key=len):
        if not any(_within(path, k) for k in kept):
            kept.append(path)
    return tuple(sorted(kept))


class _Mounter:
    """Thin checked wrappers over mount(2), umount2(2) and pivot_root(2)."""

    def __init__(self) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.mount.argtypes = [
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_ulong,
            ctypes.c_char_p,
        ]

    def mount(self, source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
        if (
            self.libc.mount(
                None if source is None else source.encode(),
                target.encode(),
                None if fstype is None else fstype.encode(),
                flags,
                data.encode() if data else None,
            )
            != 0
        ):
            err = ctypes.get_errno()
            raise JailError(err, f"mount {source} on {target} ({fstype}): {os.strerror(err)}")

    def umount(self, target: str, flags: int = MNT_DETACH) -> None:
        if self.libc.umount2(target.encode(), flags) != 0:
            err = ctypes.get_errno()
            raise JailError(err, f"umount {target}: {os.strerror(err)}")

    def pivot_root(self, new_root: str, put_old: str) -> None:
        number = _PIVOT_ROOT.get(platform.machine())
        if number is None:
            raise JailError(0, f"pivot_root: unknown syscall number on {platform.machine()}")
        if self.libc.syscall(number, new_root.encode(), put_old.encode()) != 0:
            err = ctypes.get_errno()
            raise JailError(err, f"pivot_root: {os.strerror(err)}")


def enter(view: View, *, own_proc: bool) -> None:
    """Build the new root described by ``view`` and make it this process's ``/``.

    Args:
        view: What to show.
        own_proc: The process is in its own pid namespace, so a fresh /proc shows
            only the sandbox's processes. Without one, /proc is mounted with
            ``hidepid=invisible`` so the task sees no process of another uid.
    """
    m = _Mounter()
    m.mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount reaches the host
    root = view.root
    m.mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=8m,mode=0755")
    # The private scratch mounts come first: a shown path that lives under /tmp (a
    # checkout or venv there) is then bound on top of them, not hidden beneath them.
    _dev(m, root, view.tmp_bytes)
    for path, size in (("/tmp", view.tmp_bytes), ("/var/tmp", view.tmp_bytes), ("/run", 1024**2)):
        _dir(root, path)
        m.mount("tmpfs", _inside(root, path), "tmpfs", MS_NOSUID | MS_NODEV, f"size={size},mode=1777")
    for path in (*SYSTEM_DIRS, *view.show, *ETC_FILES):
        try:
            _show(m, root, path)
        except JailError as exc:
            if exc.errno:  # a failed mount, not a path already covered by a symlink
                raise
    _write(
        root,
        "/etc/passwd",
        f"root:x:0:0::/:/bin/false\nsandbox:x:{view.uid}:{view.uid}::{SCRATCH}:/bin/false\n",
    )
    _write(root, "/etc/group", f"root:x:0:\nsandbox:x:{view.uid}:\n")
    for path in view.hide:
        target = _inside(root, path)
        if os.path.isdir(target) and not _crosses_symlink(root, path):
            m.mount(
                "tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, "size=4k,mode=0555"
            )
    _dir(root, SCRATCH)
    m.mount(view.scratch, _inside(root, SCRATCH), None, MS_BIND)
    m.mount(None, _inside(root, SCRATCH), None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV)
    _dir(root, "/proc")
    proc_flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    m.mount("proc", _inside(root, "/proc"), "proc", proc_flags, "" if own_proc else "hidepid=invisible")
    for path in ("/home", "/root", "/sys", "/mnt", "/opt", "/srv", "/var/lib"):
        _dir(root, path)
    os.chdir(root)
    m.pivot_root(".", ".")  # the old root is stacked on top of the new one ...
    m.umount(".")  # ... and detached, with everything the host had mounted under it
    os.chdir("/")
    m.mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _crosses_symlink(root: str, path: str) -> bool:
    target = root
    for part in [p for p in path.split("/") if p]:
        target = f"{target}/{part}"
        if os.path.islink(target):
            return True
    return False


def _inside(root: str, path: str) -> str:
    return root + "/" + path.lstrip("/")


def _dir(root: str, path: str) -> str:
    """Create ``path`` (and parents) inside the new root as 0755 directories.

    The interpreter may live under a 0700 directory such as /root; its stand-ins
    here are world-searchable, so the task's uid reaches the shown subtree.
    """
    target = root
    for part in [p for p in path.split("/") if p]:
        target = f"{target}/{part}"
        if os.path.islink(target):
            # Created here for a system directory (/lib -> usr/lib): following it now
            # could land outside the new root.
            raise JailError(0, f"{path} crosses a symlink inside the sandbox root")
        if not os.path.isdir(target):
            os.mkdir(target, 0o755)
            os.chmod(target, 0o755)
    return target


def _show(m: _Mounter, root: str, path: str) -> None:
    """Show host ``path`` read-only at the same place, recreating a symlink as a symlink."""
    if os.path.islink(path):
        parent = _dir(root, os.path.dirname(path))
        target = f"{parent}/{os.path.basename(path)}"
        if not os.path.lexists(target):
            os.symlink(os.readlink(path), target)
        return
    if not os.path.exists(path):
        return
    if os.path.isdir(path):
        target = _dir(root, path)
    else:
        target = f"{_dir(root, os.path.dirname(path))}/{os.path.basename(path)}"
        with open(target, "a"):
            pass
    m.mount(path, target, None, MS_BIND)
    m.mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _write(root: str, path: str, text: str) -> None:
    target = f"{_dir(root, os.path.dirname(path))}/{os.path.basename(path)}"
    with open(target, "w") as out:
        out.write(text)
    os.chmod(target, 0o644)


def _dev(m: _Mounter, root: str, tmp_bytes: int) -> None:
    """A minimal /dev: the harmless character devices, std* links, a private /dev/shm."""
    dev = _dir(root, "/dev")
    m.mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=0755")
    for name in DEVICES:
        target = f"{dev}/{name}"
        with open(target, "a"):
            pass
        m.mount(f"/dev/{name}", target, None, MS_BIND)
    for name, link in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0")):
        os.symlink(link, f"{dev}/{name}")
    os.symlink("/proc/self/fd/1", f"{dev}/stdout")
    os.symlink("/proc/self/fd/2", f"{dev}/stderr")
    os.mkdir(f"{dev}/shm")
    m.mount("tmpfs", f"{dev}/shm", "tmpfs", MS_NOSUID | MS_NODEV, f"size={tmp_bytes},mode=1777")


def hidden_paths(paths: Sequence[str | Path]) -> tuple[str, ...]:
    """Real paths of ``paths`` that exist, for `View.hide`."""
    return tuple(sorted({os.path.realpath(p) for p in paths if os.path.isdir(p)}))
