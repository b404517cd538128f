"""What a task can reach of the host: the attacks of issue 7, each against a real sandbox.

The daemon holds secrets (its TLS key inside OpenSSL, its broker token, the account's
password, its environment) and serves one requester after another. A task is a
stranger's code: it must find none of the daemon's secrets in its own memory or in
/proc, nothing another session left in any writable place, no unix socket of the host,
no host process to see or signal, and nothing it starts may outlive its session.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from peer.sandbox import Slot
from tests.peer.conftest import run
from tests.peer.conftest import test_limits as limits_for_tests

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="confinement as the peer runs it: as root")

WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run", "/run/lock", "/scratch")


def search_memory(needles: list[tuple[bytes, bytes]]) -> dict[str, list[str]]:
    """In the sandbox: every place a needle shows up in this process's memory and /proc."""
    import ctypes
    import os

    # Dropping to the slot's uid made the process non-dumpable, which makes its own
    # /proc/self/mem root's; a task may undo that for itself, and an attacker would.
    ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE
    hits: dict[str, list[str]] = {"memory": [], "proc": []}
    with open("/proc/self/maps") as maps, open("/proc/self/mem", "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            if "r" not in fields[1] or (len(fields) > 5 and fields[5].startswith("[v")):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            try:
                mem.seek(start)
                chunk = mem.read(end - start)
            except (OSError, OverflowError, ValueError):
                continue
            # The needles reach the task only as hex; find them in their raw form.
            for head, rest in needles:  # halves: the whole needle is never built here
                at = chunk.find(head)
                while at >= 0:
                    if chunk[at + len(head) : at + len(head) + len(rest)] == rest:
                        hits["memory"].append(line.strip())
                        break
                    at = chunk.find(head, at + 1)
    for pid in os.listdir("/proc"):
        for name in ("environ", "cmdline"):
            try:
                with open(f"/proc/{pid}/{name}", "rb") as f:
                    data = f.read()
            except OSError:
                continue
            hits["proc"] += [f"{pid}/{name}" for head, rest in needles if head + rest in data]
    return hits


def test_a_task_finds_none_of_the_daemons_secrets_in_memory_or_proc(tmp_path: Path) -> None:
    secret = os.urandom(12).hex().encode()
    os.environ["PEER_TEST_SECRET"] = secret.decode()
    kept = [secret * 2, bytearray(secret), secret.decode()]  # held by the "daemon"
    try:
        with Slot(limits_for_tests(), 0, tmp_path) as slot:
            # The task gets the needle in halves, so neither its code nor its
            # arguments contain the whole secret.
            head, rest = secret[:12], secret[12:]
            hits = run(slot, lambda: search_memory([(head, rest)]))
            assert kept  # still alive in the daemon while the task looked
    finally:
        del os.environ["PEER_TEST_SECRET"]
    assert hits == {"memory": [], "proc": []}


def test_a_task_sees_a_read_only_world_with_private_empty_scratch(slot: Slot) -> None:
    def survey() -> dict[str, Any]:
        import os

        seen: dict[str, Any] = {"listings": {}, "writable": [], "sockets": []}
        for path in ("/tmp", "/var/tmp", "/dev/shm", "/run", "/home", "/root", "/scratch"):
            seen["listings"][path] = sorted(os.listdir(path)) if os.path.isdir(path) else None
        for path in ("/", "/usr", "/etc", "/home", "/root", "/var", "/tmp", "/dev/shm", "/run", "/scratch"):
            try:
                with open(os.path.join(path, ".probe"), "w"):
                    pass
                seen["writable"].append(path)
            except OSError:
                pass
        for top, _dirs, files in os.walk("/", onerror=lambda e: None):
            if top.startswith("/proc"):
                continue
            for name in files:
                try:
                    if __import__("stat").S_ISSOCK(os.lstat(os.path.join(top, name)).st_mode):
                        seen["sockets"].append(os.path.join(top, name))
                except OSError:
                    pass
        seen["etc"] = sorted(os.listdir("/etc"))
        return seen

    seen = survey_once = run(slot, survey)
    # A checkout or venv that lives under /tmp is shown there (read-only); nothing else.
    stand_ins = sorted({p.split("/")[2] for p in slot.shown_paths if p.startswith("/tmp/")})
    assert survey_once["listings"] == {
        "/tmp": stand_ins,
        "/var/tmp": [],
        "/dev/shm": [],
        "/run": [],
        "/home": [],
        "/root": seen["listings"]["/root"],
        "/scratch": [],
    }
    # /root holds at most the stand-in path to an interpreter installed there.
    assert set(seen["listings"]["/root"]) <= {".pyenv"}
    assert sorted(seen["writable"]) == ["/dev/shm", "/run", "/scratch", "/tmp"]
    assert seen["sockets"] == []  # PostgreSQL's, Redis', anyone's: not there to connect to
    assert "shadow" not in seen["etc"] and "passwd" in seen["etc"]


def test_a_task_cannot_reach_a_unix_socket_of_the_host(slot: Slot) -> None:
    with tempfile.TemporaryDirectory() as name:
        path = os.path.join(name, "service.sock")
        os.chmod(name, 0o755)
        with socket.socket(socket.AF_UNIX) as server, socket.socket(socket.AF_UNIX) as abstract:
            server.bind(path)
            os.chmod(path, 0o777)
            server.listen()
            abstract.bind(b"\0compute-broker-test-" + os.urandom(4).hex().encode())
            abstract.listen()

            def connect(address: str | bytes) -> str:
                import socket

                with socket.socket(socket.AF_UNIX) as client:
                    try:
                        client.connect(address)
                    except OSError as exc:
                        return type(exc).__name__
                return "connected"

            for address in (path, abstract.getsockname()):
                with socket.socket(socket.AF_UNIX) as control:
                    control.connect(address)  # reachable from the host
                assert run(slot, connect, address) in {"FileNotFoundError", "ConnectionRefusedError"}


def test_a_task_can_neither_see_nor_signal_host_processes(slot: Slot) -> None:
    me = os.getpid()

    def look() -> dict[str, Any]:
        import os
        import signal

        pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
        try:
            os.kill(me, signal.SIGTERM)
            signalled = "delivered"
        except OSError as exc:
            signalled = type(exc).__name__
        return {"pids": pids, "signalled": signalled, "own": os.getpid()}

    seen = run(slot, look)
    assert seen["own"] == 2 and seen["pids"] == [1, 2]  # its init and itself
    assert seen["signalled"] in {"ProcessLookupError", "PermissionError"}


def test_nothing_one_session_writes_reaches_the_next(slot: Slot) -> None:
    def leave_traces() -> list[str]:
        import os

        left = []
        for path in WRITABLE:
            try:
                with open(os.path.join(path, "from-session-a"), "w") as f:
                    f.write("secret of A")
                left.append(path)
            except OSError:
                pass
        return left

    def find_traces() -> list[str]:
        import os

        return [p for p in WRITABLE if os.path.exists(os.path.join(p, "from-session-a"))]

    assert set(run(slot, leave_traces)) >= {"/tmp", "/dev/shm", "/run", "/scratch"}
    slot.recycle()  # the daemon does this between sessions
    assert run(slot, find_traces) == []


def test_a_private_tmpfs_is_capped_and_its_memory_goes_with_the_child(
    make_slot: Callable[..., Slot],
) -> None:
    slot = make_slot(fsize=1024**3)

    def fill_shm() -> str:
        try:
            with open("/dev/shm/fill", "wb") as out:
                for _ in range(256):
                    out.write(b"x" * 1024**2)
        except OSError as exc:
            return f"{type(exc).__name__}: {exc.errno}"
        return "wrote 256 MiB"

    shared_before = _shmem_kib()
    import errno

    assert run(slot, fill_shm) == f"OSError: {errno.ENOSPC}"
    assert _shmem_kib() - shared_before > 32 * 1024  # the capped 64 MiB is held now ...
    slot.recycle()
    deadline = time.monotonic() + 5
    while _shmem_kib() - shared_before > 8 * 1024 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _shmem_kib() - shared_before < 8 * 1024  # ... and given back with the child


def _shmem_kib() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("Shmem:"):
                return int(line.split()[1])
    raise RuntimeError("no Shmem in /proc/meminfo")


def _start_survivor() -> str:
    """In the sandbox: start a process that outlives the task, in a session of its own.

    posix_spawn runs no Python fork hooks, so the child is not marked doubtful and
    replaced at once, as it is after os.fork.
    """
    import os

    os.posix_spawn("/bin/sleep", ["sleep", "300"], {}, setsid=True)
    return "started"


def _sleepers(uid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as status:
                text = status.read()
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                argv = cmdline.read()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        if int(fields["Uid"].split()[0]) == uid and argv == b"sleep\x00300\x00":
            if not fields["State"].strip().startswith("Z"):
                found.append(int(entry))
    return found


def _gone(uid: int, within: float = 5.0) -> list[int]:
    deadline = time.monotonic() + within
    while (left := _sleepers(uid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def test_a_process_a_task_leaves_behind_ends_with_its_session(slot: Slot) -> None:
    assert slot.uid is not None
    assert run(slot, _start_survivor) == "started"
    assert _sleepers(slot.uid), "control: the survivor runs while the session lasts"
    slot.recycle()
    assert _gone(slot.uid) == []


@pytest.fixture
def daemon_like(tmp_path: Path) -> Iterator[Callable[[], subprocess.Popen[str]]]:
    """A separate process driving a slot, as the daemon does, that the test can SIGKILL."""
    procs: list[subprocess.Popen[str]] = []
    program = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parents[2])!r})
        from pathlib import Path
        from tests.peer.conftest import run
        from tests.peer.conftest import test_limits as limits_for_tests
        from tests.peer.test_confinement import _start_survivor
        from peer.sandbox import Slot
        slot = Slot(limits_for_tests(), 5, Path({str(tmp_path)!r}))
        print(run(slot, _start_survivor), slot.uid, flush=True)
        sys.stdin.read()
        """
    )

    def start() -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", program], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_survivor_is_gone_after_the_daemon_is_sigkilled(
    daemon_like: Callable[[], subprocess.Popen[str]],
) -> None:
    proc = daemon_like()
    assert proc.stdout is not None
    started, uid = proc.stdout.readline().split()
    assert started == "started"
    assert _sleepers(int(uid)), "control: the survivor runs while the daemon lives"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _gone(int(uid)) == []


def test_a_restarted_slot_first_kills_what_still_runs_under_its_uid(tmp_path: Path) -> None:
    """Leftovers of a daemon from before (or anything else under a slot's uid) never
    meet the next requester's files."""
    uid = 61000 + 6
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the leftover
        try:
            os.setgid(uid)
            os.setuid(uid)
            os.execv("/bin/sleep", ["sleep", "300"])
        finally:
            os._exit(1)
    try:
        deadline = time.monotonic() + 5
        while not _sleepers(uid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _sleepers(uid) == [pid]
        with Slot(limits_for_tests(), 6, tmp_path):
            assert _gone(uid) == []
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def test_every_layer_holds_as_root(slot: Slot) -> None:
    assert slot.missing_layers() == {}
    assert set(slot.layers) == {"identity", "mount", "pid", "net", "ipc"}


def test_the_sandbox_environment_holds_nothing_of_the_daemons(slot: Slot) -> None:
    os.environ["PEER_TEST_TOKEN"] = "token-value"
    try:
        slot.recycle()
        environ = run(slot, lambda: dict(os.environ))
    finally:
        del os.environ["PEER_TEST_TOKEN"]
    assert "PEER_TEST_TOKEN" not in environ
    assert set(environ) <= {
        "PATH",
        "LANG",
        "HOME",
        "OPENBLAS_NUM_THREADS",
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
    }
    assert json.dumps(environ)  # plain strings only
