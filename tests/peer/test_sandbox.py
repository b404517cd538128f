"""Sandbox tests, run as root like the peer: every escape attempt fails and the slot keeps serving."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import signal
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from peer import codec
from peer.errors import SandboxError, TaskError
from peer.sandbox import Limits, Slot
from tests.peer.conftest import run

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox uses Linux namespaces")


def live_processes(uid: int) -> list[int]:
    """Pids of processes of real uid ``uid`` that are not zombies (SIGKILL lands asynchronously)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as status:
                fields = dict(line.split(":", 1) for line in status if ":" in line)
        except OSError:
            continue
        if int(fields["Uid"].split()[0]) == uid and not fields["State"].strip().startswith("Z"):
            pids.append(int(entry))
    return pids


def settled_processes(uid: int, expected: list[int], within: float = 5.0) -> list[int]:
    """Wait until the uid's live processes are ``expected`` (or time runs out) and return them."""
    deadline = time.monotonic() + within
    while (pids := live_processes(uid)) != expected and time.monotonic() < deadline:
        time.sleep(0.02)
    return pids


def assert_serves(slot: Slot) -> None:
    """The slot runs an ordinary task correctly (after whatever happened before)."""
    assert run(slot, lambda x, *, y: x * y, 6, y=7) == 42


def test_runs_functions_with_args_and_kwargs(slot: Slot) -> None:
    base = 100
    assert run(slot, lambda a, b=0: a + b + base, 1, b=2) == 103


def test_numpy_in_and_out(slot: Slot) -> None:
    array = np.arange(100_000, dtype=np.float64)
    got = run(slot, lambda a: a * 2, array)
    np.testing.assert_array_equal(got, array * 2)


def test_code_is_sent_once_and_reused(slot: Slot) -> None:
    code = codec.dumps_code(lambda x: x + 1)
    name = codec.code_id(code)
    slot.run(name, code, codec.dumps_data(((1,), {})))
    got = slot.run(name, None, codec.dumps_data(((2,), {})))
    assert codec.loads_data(got, trusted=False) == 3


def test_unknown_code_id_is_refused(slot: Slot) -> None:
    with pytest.raises(SandboxError, match="no code"):
        slot.run("nope", None, codec.dumps_data(((), {})))


def test_code_that_fails_to_load_is_reported(slot: Slot) -> None:
    with pytest.raises(TaskError) as info:
        slot.run("bad", b"not a pickle", codec.dumps_data(((), {})))
    assert info.value.type_name == "_pickle.UnpicklingError"
    assert_serves(slot)


def test_runs_unprivileged_in_its_scratch_dir(slot: Slot) -> None:
    uid, cwd = run(slot, lambda: (os.getuid(), os.getcwd()))
    assert os.geteuid() == 0, "these tests run as root, as the peer does"
    assert uid == slot.uid == 61000
    assert cwd == "/scratch"
    run(slot, lambda: open("note", "w").write("hi"))
    work = slot.work_dir
    assert work is not None and (work / "note").read_text() == "hi"
    assert stat.S_IMODE(work.stat().st_mode) == 0o700
    assert work.stat().st_uid == slot.uid


def test_exception_comes_back_as_text_and_child_is_kept(slot: Slot) -> None:
    pid = slot.pid

    def divide() -> float:
        return 1 / 0

    with pytest.raises(TaskError) as info:
        run(slot, divide)
    error = info.value
    assert error.type_name == "ZeroDivisionError"
    assert error.message == "division by zero"
    assert "test_sandbox.py" in error.traceback_text
    # The host cannot read the requester's files; the requester shows its own lines.
    assert "return 1 / 0" in str(error)
    assert "ZeroDivisionError: division by zero" in str(error)
    assert_serves(slot)
    assert slot.pid == pid  # an ordinary exception does not cost a new child


def test_unpicklable_result_is_an_error(slot: Slot) -> None:
    with pytest.raises(TaskError, match="generator"):
        run(slot, lambda: (x for x in range(3)))
    assert_serves(slot)


def test_memory_bomb_raises_memory_error(slot: Slot) -> None:
    def bomb() -> int:
        hoard = []
        while True:
            hoard.append(bytearray(64 * 1024**2))

    pid = slot.pid
    with pytest.raises(TaskError) as info:
        run(slot, bomb)
    assert info.value.type_name == "MemoryError"
    assert slot.pid != pid  # a child that ran out of memory is replaced
    assert_serves(slot)


def test_endless_loop_times_out(slot: Slot) -> None:
    def spin() -> None:
        while True:
            pass

    started = time.monotonic()
    with pytest.raises(TaskError, match=r"task exceeded 0\.5 s timeout") as info:
        run(slot, spin, timeout=0.5)
    assert info.value.type_name == "TimeoutError"
    assert time.monotonic() - started < 3
    assert_serves(slot)


def test_cpu_limit_kills_with_sigxcpu(make_slot: Callable[..., Slot]) -> None:
    slot = make_slot(cpu_seconds=1)

    def spin() -> None:
        while True:
            pass

    with pytest.raises(TaskError, match="SIGXCPU") as info:
        run(slot, spin)
    assert info.value.type_name == "SandboxDied"
    assert_serves(slot)


def test_bounded_fork_bomb_hits_nproc_and_is_cleaned_up(slot: Slot) -> None:
    def bomb() -> int:
        forked = 0
        for _ in range(200):
            if os.fork() == 0:
                time.sleep(60)
                os._exit(0)
            forked += 1
        return forked

    with pytest.raises(TaskError) as info:
        run(slot, bomb)
    assert info.value.type_name == "BlockingIOError"
    assert "Resource temporarily unavailable" in info.value.message
    assert_serves(slot)
    servers = slot.server_pids()
    assert settled_processes(slot.uid, servers) == servers  # the sleepers were killed


def test_segfault_is_reported(slot: Slot) -> None:
    with pytest.raises(TaskError, match="sandbox died with SIGSEGV") as info:
        run(slot, lambda: ctypes.string_at(0))
    assert info.value.type_name == "SandboxDied"
    assert_serves(slot)


def test_os_exit_is_reported(slot: Slot) -> None:
    with pytest.raises(TaskError, match="sandbox exited with status 3"):
        run(slot, lambda: os._exit(3))
    assert_serves(slot)


def test_sigkill_is_reported(slot: Slot) -> None:
    with pytest.raises(TaskError, match="sandbox died with SIGKILL"):
        run(slot, lambda: os.kill(os.getpid(), signal.SIGKILL))
    assert_serves(slot)


def test_system_exit_is_an_error_and_replaces_the_child(slot: Slot) -> None:
    pid = slot.pid
    with pytest.raises(TaskError, match="SystemExit"):
        run(slot, lambda: sys.exit(4))
    assert slot.pid != pid
    assert_serves(slot)


def test_child_killed_between_tasks_is_replaced(slot: Slot) -> None:
    os.kill(slot.pid, signal.SIGKILL)
    time.sleep(0.05)
    assert_serves(slot)


def test_code_is_resent_to_a_fresh_child(slot: Slot) -> None:
    code = codec.dumps_code(lambda: "still here")
    name = codec.code_id(code)
    slot.run(name, code, codec.dumps_data(((), {})))
    with pytest.raises(TaskError):
        run(slot, lambda: os._exit(1))
    assert codec.loads_data(slot.run(name, None, codec.dumps_data(((), {}))), trusted=False) == "still here"


@pytest.fixture
def key_dir() -> Iterator[Path]:
    """A world-searchable directory holding a root-only key and a public file."""
    with tempfile.TemporaryDirectory(prefix="peer-key-") as name:
        path = Path(name)
        path.chmod(0o755)
        key = path / "peer.key"
        key.write_text("-----BEGIN PRIVATE KEY-----\nsecret\n")
        key.chmod(0o600)
        public = path / "peer.crt"
        public.write_text("certificate")
        public.chmod(0o644)
        yield path


def test_cannot_see_the_peers_key(slot: Slot, key_dir: Path) -> None:
    """Not a permission check that a uid slip would undo: the host's files are not there."""
    assert (key_dir / "peer.crt").read_text() == "certificate"  # control, on the host
    for name in ("peer.key", "peer.crt"):
        with pytest.raises(TaskError) as info:
            run(slot, lambda name=name: (key_dir / name).read_text())
        assert info.value.type_name == "FileNotFoundError"
    assert run(slot, lambda: os.path.exists(key_dir)) is False
    assert_serves(slot)


def test_no_network(slot: Slot) -> None:
    assert slot.network_isolated, "as root, unshare(CLONE_NEWNET) must work"
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        socket.create_connection(("127.0.0.1", port), timeout=2).close()  # control: reachable here

        def connect() -> None:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()

        with pytest.raises(TaskError) as info:
            run(slot, connect)
    assert info.value.type_name in {"OSError", "ConnectionRefusedError"}
    assert str(errno.ENETUNREACH) in info.value.message or "unreachable" in info.value.message
    assert_serves(slot)


def test_file_size_limit(slot: Slot) -> None:
    def write_big() -> None:
        with open("big", "wb") as out:
            out.write(b"x" * (2 * 1024**2))

    with pytest.raises(TaskError, match="File too large") as info:
        run(slot, write_big)
    assert info.value.type_name == "OSError"
    assert_serves(slot)


def test_inherited_descriptors_are_closed(slot: Slot) -> None:
    with open(__file__) as held:  # an fd open in the daemon when the child forks
        held_fd = held.fileno()
        slot.close()
        fresh = Slot(slot.limits, 0, slot.scratch.parent)
        try:
            fds = run(fresh, lambda: sorted(int(fd) for fd in os.listdir("/proc/self/fd")))
        finally:
            fresh.close()
    assert held_fd not in fds
    assert len(fds) <= 5  # stdio, the socket, and the listdir handle


def test_two_slots_have_separate_uids(make_slot: Callable[..., Slot]) -> None:
    first, second = make_slot(0), make_slot(1)
    assert run(first, os.getuid) != run(second, os.getuid)


def test_recycles_after_max_tasks(make_slot: Callable[..., Slot]) -> None:
    slot = make_slot(max_tasks=3)

    def interpreter() -> str:  # every child is pid 2 of its namespace: tell them apart
        import builtins

        return builtins.__dict__.setdefault("_sandbox_token", os.urandom(8).hex())

    tokens = [run(slot, interpreter) for _ in range(7)]
    assert len(set(tokens)) == 3


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="timeout"):
        Limits(timeout=0)


def test_a_task_that_forks_gets_a_fresh_child(slot: Slot) -> None:
    def fork_and_wait() -> int:
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        return os.waitpid(pid, 0)[1]

    pid = slot.pid
    assert run(slot, fork_and_wait) == 0
    assert slot.pid != pid


def test_death_is_noticed_while_a_grandchild_holds_the_socket(slot: Slot) -> None:
    def exit_behind_a_c_fork() -> None:
        libc = ctypes.CDLL(None)
        if libc.fork() == 0:  # no Python fork hooks: the grandchild keeps the socket
            time.sleep(30)
            os._exit(0)
        os._exit(5)

    started = time.monotonic()
    with pytest.raises(TaskError, match="sandbox exited with status 5"):
        run(slot, exit_behind_a_c_fork, timeout=20)
    assert time.monotonic() - started < 5
    servers = slot.server_pids()
    assert settled_processes(slot.uid, servers) == servers


def reachable_interpreter() -> None:
    """Let a plain user run this interpreter, in this process only.

    It lives under /root (0700) here; a contributor without root runs one of their
    own. In a private mount namespace, /root becomes a world-searchable tmpfs
    holding only the interpreter's tree: the host's /root is untouched.
    """
    from peer import jail

    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.unshare(0x00020000) == 0, "unshare(CLONE_NEWNS)"
    mounter = jail._Mounter()
    mounter.mount(None, "/", None, jail.MS_REC | jail.MS_PRIVATE)
    stage = tempfile.mkdtemp(prefix="peer-root-")
    mounter.mount("tmpfs", stage, "tmpfs", 0, "mode=0755")
    for top in {
        Path(p).relative_to("/root").parts[0] for p in (sys.base_prefix, sys.prefix) if p.startswith("/root/")
    }:
        os.mkdir(f"{stage}/{top}", 0o755)
        mounter.mount(f"/root/{top}", f"{stage}/{top}", None, jail.MS_BIND | jail.MS_REC)
    mounter.mount(stage, "/root", None, jail.MS_BIND | jail.MS_REC)


def unprivileged_daemon(scratch: Path) -> dict[str, object]:
    """Run a slot as a daemon without root would: in a forked process as ``nobody``."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - reports through the pipe
        report: dict[str, object] = {}
        try:
            reachable_interpreter()
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            with Slot(Limits(memory=8 * 1024**3, timeout=5), 0, scratch) as slot:
                report["isolated"] = slot.network_isolated
                report["layers"] = slot.layers
                report["stand_ins"] = sorted(
                    {p.split("/")[2] for p in slot.shown_paths if p.startswith("/tmp/")}
                )
                report["view"] = run(
                    slot,
                    lambda: {
                        "tmp": os.listdir("/tmp"),
                        "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
                        "postgres": os.path.exists("/var/run/postgresql"),
                        "root": os.listdir("/root"),
                        "writable_usr": os.access("/usr", os.W_OK),
                    },
                )
                report["uid"] = run(slot, os.getuid)
                try:
                    run(slot, lambda: socket.create_connection(("127.0.0.1", 9), timeout=1))
                except TaskError as exc:
                    report["connect"] = exc.message
                try:
                    run(slot, lambda: os._exit(2))
                except TaskError as exc:
                    report["exit"] = exc.message
                report["after"] = run(slot, lambda: 7)
        except BaseException as exc:
            report["error"] = repr(exc)
        finally:
            os.write(write_end, json.dumps(report).encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        raw = reader.read()
    os.waitpid(pid, 0)
    return json.loads(raw)


def test_without_root_a_user_namespace_cuts_the_network() -> None:
    with tempfile.TemporaryDirectory(prefix="peer-nobody-") as name:  # pytest's tmp is root-only
        Path(name).chmod(0o777)
        report = unprivileged_daemon(Path(name))
    assert "error" not in report, report
    assert report["isolated"] is True
    layers = report["layers"]
    assert isinstance(layers, dict)
    assert {name for name, why in layers.items() if why} == set(), layers  # every layer holds
    # The same view as under root: private empty /tmp, only its own processes, no
    # host sockets, a read-only system.
    view = report["view"]
    assert isinstance(view, dict)
    assert set(view.pop("root")) <= {".pyenv"}  # at most the stand-in path to an interpreter there
    assert view == {"tmp": report["stand_ins"], "pids": [1, 2], "postgres": False, "writable_usr": False}
    assert report["uid"] == 65534
    assert "unreachable" in str(report["connect"])
    assert report["exit"] == "sandbox exited with status 2"
    assert report["after"] == 7


def test_memory_limit_below_the_daemons_own_size_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SandboxError, match=r"Limits\.memory .* below"):
        Slot(Limits(memory=64 * 1024**2), 0, tmp_path)


def test_task_forging_its_own_error_frame_cannot_break_the_slot(slot: Slot) -> None:
    """Task code can write frames on the sandbox's socket itself; a forged ERROR with
    fields of the wrong types must not escape `Slot.run` as anything but a TaskError."""

    def forge() -> None:
        import json
        import os
        import socket as sk
        import stat

        from peer import wire

        for fd in range(3, 256):
            try:
                if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                    continue
                s = sk.socket(fileno=os.dup(fd))
                body = json.dumps({"type": "X", "message": [], "cpu": None, "dirty": "no"}).encode()
                wire.write_frame(s, wire.Kind.ERROR, [body])
                s.detach()
            except OSError:
                continue
        os._exit(0)

    with pytest.raises(TaskError):
        run(slot, forge)
    assert_serves(slot)
