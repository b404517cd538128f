"""Run the whole stack from the Procfile on this machine, on free ports.

``python -m scripts.stack`` starts Redis (a local one unless ``REDIS_URL`` is set), the
API under gunicorn and a matchmaker, prints the API's URL, and stops everything on
Ctrl-C. The demo, the benchmarks and the end-to-end tests use ``LocalStack`` the same way.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import requests

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def procfile() -> dict[str, str]:
    """The Procfile as name -> command line."""
    entries = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, command = line.partition(":")
            entries[name.strip()] = command.strip()
    return entries


class Process:
    """One Procfile process (or, with ``argv``, any command), run as honcho would, in
    its own process group so that stopping it stops its children (gunicorn workers,
    rq's scheduler, a peer's sandboxes) too."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path, argv: list[str] | None = None) -> None:
        self.name = name
        self.log = log_dir / f"{name}-{time.monotonic_ns()}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                argv or ["bash", "-c", f"exec {procfile()[name]}"],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 60.0) -> None:
        """Wait until ``text`` appears in the output, failing early if the process exits."""
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.output()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} never said {text!r}:\n{self.output()}")
            time.sleep(0.05)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers of the group
        except ProcessLookupError:
            pass
        self.proc.wait(5)


def init_account(broker: str, home: Path, email: str, password: str, address: str | None = None) -> str:
    """``python -m peer init``: an account (created or logged in to) whose key pair lives
    in ``home``; returns what the command printed."""
    argv = [sys.executable, "-m", "peer", "--home", str(home), "init", "--broker", broker, "--email", email]
    if address:
        argv += ["--address", address]
    env = {**os.environ, "COMPUTE_BROKER_PASSWORD": password}
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"peer init for {email} failed: {result.stderr.strip()}")
    return result.stdout.strip()


class Peer:
    """A contributor's daemon: ``python -m peer init`` for a fresh account, then
    ``python -m peer serve`` on a free loopback port (``extra``: more serve options).
    Call ``wait_for("serving")`` before using it."""

    def __init__(
        self,
        broker: str,
        workdir: Path,
        name: str,
        *,
        password: str,
        jobs: int = 1,
        extra: tuple[str, ...] = (),
        email: str | None = None,
    ) -> None:
        self.home = workdir / name
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.email = email or f"{name}-{time.monotonic_ns()}@example.org"
        self.init_output = init_account(broker, self.home, self.email, password, self.address)
        scratch = str(workdir / f"{name}-scratch")
        argv = [sys.executable, "-m", "peer", "--home", str(self.home), "serve", "--jobs", str(jobs),
                "--port", str(self.port), "--host", "127.0.0.1", "--scratch", scratch]  # fmt: skip
        self.process = Process(name, dict(os.environ), workdir, argv=[*argv, *extra])

    def wait_for(self, text: str, timeout: float = 60.0) -> None:
        self.process.wait_for(text, timeout)

    def output(self) -> str:
        return self.process.output()

    def stop(self) -> None:
        self.process.stop()


def wait_http(url: str, timeout: float = 30.0, proc: Process | None = None) -> None:
    """Wait until ``url`` answers 200, failing early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        if proc is not None and proc.proc.poll() is not None:
            raise RuntimeError(f"{proc.name} exited:\n{proc.output()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer 200 within {timeout} s")
        time.sleep(0.1)


class LocalStack:
    """Redis (unless ``REDIS_URL`` is set), gunicorn, matchmakers and a prober in a data
    dir; probes of loopback addresses allowed (``PROBE_PRIVATE_ADDRESSES``).

    Args:
        data_dir: where the SQLite file, token keys and Redis socket live (a fresh
            temporary directory by default).
        matchmakers: how many matchmaker processes to run.
        env: extra environment for every process.
    """

    def __init__(
        self,
        *,
        data_dir: Path | None = None,
        matchmakers: int = 1,
        env: dict[str, str] | None = None,
        port: int | None = None,
    ) -> None:
        self._tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="compute-broker-")
        self.data_dir = data_dir or Path(self._tmp.name)  # type: ignore[union-attr]
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "COMPUTE_BROKER_DATA": str(self.data_dir),
            "PORT": str(self.port),
            # Peers of a local stack listen on loopback: let the broker probe them there.
            "PROBE_PRIVATE_ADDRESSES": "1",
            **(env or {}),
        }
        self.matchmakers = matchmakers
        self.processes: list[Process] = []

    def start(self) -> LocalStack:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            if not self.env.get("REDIS_URL"):
                self.processes.append(Process("redis", self.env, self.data_dir))
            web = Process("web", self.env, self.data_dir)
            self.processes.append(web)
            self.processes += [
                Process("matchmaker", self.env, self.data_dir) for _ in range(self.matchmakers)
            ]
            self.processes.append(Process("prober", self.env, self.data_dir))
            wait_http(f"{self.url}/v1/health", timeout=60, proc=web)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()
        self.processes.clear()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.stack", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT / "var", help="default: ./var")
    parser.add_argument("--matchmakers", type=int, default=1)
    parser.add_argument("--port", type=int, default=8000, help="API port (default: 8000)")
    args = parser.parse_args(argv)
    with LocalStack(data_dir=args.data_dir, matchmakers=args.matchmakers, port=args.port) as stack:
        print(f"Compute Broker API on {stack.url} (logs in {stack.data_dir}); Ctrl-C stops it.", flush=True)
        while not stopping:
            time.sleep(0.2)
    return 0


stopping: list[int] = []


def _on_signal(signum: int, frame: object) -> None:
    stopping.append(signum)


if __name__ == "__main__":
    # Handlers, not a blocked mask: children inherit a blocked mask and would then
    # ignore the SIGTERM that stops them.
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    sys.exit(main())
