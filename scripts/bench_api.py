"""Benchmark of the broker's API and matchmaker: ``python -m scripts.bench_api``.

One run measures the four figures the README quotes, each against what it should be
compared with, on this machine:

1. Throughput of an authenticated ``GET /v1/users/me`` (token check, Redis GET for the
   token version, one SQLite read) served by the real app under gunicorn, against a
   Falcon hello-world served by the same gunicorn command line (the Procfile's ``web``
   line: gthread, same workers and threads). The ratio shows what the broker's own
   work costs on top of the framework and server; the target is at least 0.5.
2. ``POST /v1/sessions`` latency at 32 concurrent connections (a SQLite write and an rq
   enqueue per request while a matchmaker consumes the queue); target p99 < 20 ms.
3. Request-to-matched latency: POST a pool of one worker, long-poll until it is no
   longer pending, with one peer offering slots and a matchmaker running; target
   p50 < 50 ms. This is what a user waits for before a pool is usable. Samples that
   wait out a whole long-poll are listed with the server's timestamps, which tell
   whether the match came late or the long-poll started after it.
4. The registry's reserve (one Lua script) for 10 slots among 100 vs 100,000 available
   peers on a private Redis; the target is the same time, since matching should cost
   what it takes, not what exists.

Load comes from a small raw-socket HTTP/1.1 keep-alive client in threads spread over a
few processes (``wrk`` is not installed here); it shares the CPU with the servers, so
absolute numbers are pessimistic and both sides of a ratio pay the same. The machine
is noisy, so each figure is a median over repeats, and the two apps of (1) are
measured alternately. Sign-ups use ``SCRYPT_N=1024`` (the cost parameter of password
hashing) so that creating the benchmark's accounts is fast; no measured request hashes
a password.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import multiprocessing.pool
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dill
import falcon
import redis
import requests
from cryptography.hazmat.primitives.asymmetric import ed25519

from broker_api.matching import keys
from broker_api.matching.queue import match_queue
from broker_api.matching.registry import Registry, runtime_bucket
from broker_api.settings import Settings
from matchmaker.local_redis import start as start_redis
from scripts.load import answer_probes, user_body
from scripts.stack import ROOT, LocalStack, Process, free_port, procfile, wait_http

RUNTIME = {"python": platform.python_version(), "dill": dill.__version__, "platform": sys.platform}
SCRYPT_N = 1024
ME_PATH = "/v1/users/me"


# -- the comparison app ---------------------------------------------------------------


class _Hello:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"hello": "world"}


#: Falcon's hello world, served by gunicorn as ``scripts.bench_api:hello_app``. It
#: answers the same path so that both apps get byte-identical requests.
hello_app = falcon.App()
hello_app.add_route(ME_PATH, _Hello())


class HelloWeb(Process):
    """The Procfile's ``web`` command line with the hello-world app in place of ours."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        web = procfile()["web"]
        if "broker_api.wsgi:app" not in web:
            raise RuntimeError(f"unexpected Procfile web line: {web}")
        self.command = web.replace("broker_api.wsgi:app", "scripts.bench_api:hello_app")
        self.name = "hello-web"
        self.log = log_dir / f"hello-web-{time.monotonic_ns()}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                ["bash", "-c", f"exec {self.command}"],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )


# -- load generator -------------------------------------------------------------------

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)


def _read_response(sock: socket.socket, buf: bytearray) -> int:
    """Read one response (Content-Length framed) from ``sock``; returns its status."""
    while (end := buf.find(b"\r\n\r\n")) < 0:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        buf += chunk
    head = bytes(buf[:end])
    match = _CONTENT_LENGTH.search(head)
    total = end + 4 + (int(match.group(1)) if match else 0)
    while len(buf) < total:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        buf += chunk
    del buf[:total]
    return int(head[9:12])


def _connection_loop(
    port: int, request: bytes, start: float, end: float, record: bool, out: list[Any]
) -> None:
    """One keep-alive connection sending ``request`` back to back until ``end``.

    Counts (and times) responses to requests sent at or after ``start``; those before
    are the warm-up. ``start`` and ``end`` are ``time.time()`` values, shared by all
    client processes.
    """
    done = errors = 0
    latencies: list[float] = []
    sock: socket.socket | None = None
    buf = bytearray()
    while True:
        t0 = time.time()
        if t0 >= end:
            break
        try:
            if sock is None:
                sock = socket.create_connection(("127.0.0.1", port), timeout=30)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                buf.clear()
            p0 = time.perf_counter()
            sock.sendall(request)
            status = _read_response(sock, buf)
            elapsed = time.perf_counter() - p0
        except OSError:
            if sock is not None:
                sock.close()
                sock = None
            if t0 >= start:
                errors += 1
            time.sleep(0.01)
            continue
        if t0 < start or time.time() > end:
            continue
        if 200 <= status < 300:
            done += 1
            if record:
                latencies.append(elapsed)
        else:
            errors += 1
    if sock is not None:
        sock.close()
    out.append((done, errors, latencies))


def client_process(
    port: int, reqs: Sequence[bytes], start: float, end: float, record: bool
) -> tuple[int, int, list[float]]:
    """Run one thread per request in ``reqs`` (one connection each); sum their results."""
    out: list[Any] = []
    threads = [
        threading.Thread(target=_connection_loop, args=(port, r, start, end, record, out)) for r in reqs
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = sum(o[0] for o in out)
    errors = sum(o[1] for o in out)
    latencies = [x for o in out for x in o[2]]
    return done, errors, latencies


@dataclass
class LoadResult:
    rps: float
    errors: int
    latencies_ms: list[float] = field(default_factory=list)


class LoadClient:
    """A pool of client processes that share out the connections."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        ctx = multiprocessing.get_context("spawn")
        self.pool: multiprocessing.pool.Pool = ctx.Pool(processes, initializer=_ignore_sigint)

    def run(
        self, port: int, reqs: Sequence[bytes], duration: float, *, record: bool = False, warmup: float = 0.7
    ) -> LoadResult:
        start = time.time() + warmup
        end = start + duration
        shares = [list(reqs[i :: self.processes]) for i in range(self.processes)]
        results = self.pool.starmap(
            client_process, [(port, share, start, end, record) for share in shares if share]
        )
        done = sum(r[0] for r in results)
        return LoadResult(
            rps=done / duration,
            errors=sum(r[1] for r in results),
            latencies_ms=[1000 * x for r in results for x in r[2]],
        )

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def http_request(method: str, port: int, path: str, token: str, body: dict[str, Any] | None = None) -> bytes:
    """The raw bytes of one HTTP/1.1 keep-alive request."""
    payload = json.dumps(body).encode() if body is not None else b""
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
        "Accept: application/json\r\n"
    )
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
    return (head + "\r\n").encode() + payload


# -- helpers --------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


class Api:
    """A minimal client of the broker's API for set-up and the sequential phase."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = requests.Session()

    def call(self, method: str, path: str, token: str | None = None, **kw: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        r = self.http.request(method, self.url + path, headers=headers, timeout=40, **kw)
        if r.status_code >= 400:
            raise RuntimeError(f"{method} {path} -> {r.status_code} {r.text}")
        return r

    def signup(self, email: str, port: int, key: ed25519.Ed25519PrivateKey | None = None) -> dict[str, Any]:
        challenge = self.call("POST", "/v1/challenges").json()["challenge"]
        body = user_body(challenge, email, "bench password", f"127.0.0.1:{port}", key)
        return self.call("POST", "/v1/users", json=body).json()


def say(*parts: object) -> None:
    print(*parts, flush=True)


# -- the four measurements ------------------------------------------------------------


@dataclass
class Throughput:
    ours: list[float]
    hello: list[float]
    errors: int


def bench_throughput(
    client: LoadClient, our_port: int, hello_port: int, tokens: Sequence[str], args: argparse.Namespace
) -> Throughput:
    reqs = [http_request("GET", our_port, ME_PATH, tokens[i % len(tokens)]) for i in range(args.connections)]
    hello_reqs = [r.replace(f":{our_port}".encode(), f":{hello_port}".encode(), 1) for r in reqs]
    result = Throughput([], [], 0)
    for rep in range(args.repeats):
        order = [("ours", our_port, reqs), ("hello", hello_port, hello_reqs)]
        for name, port, batch in order if rep % 2 == 0 else order[::-1]:
            load = client.run(port, batch, args.duration)
            getattr(result, name).append(load.rps)
            result.errors += load.errors
            say(f"  repeat {rep + 1}: {name:5} {load.rps:8.0f} req/s ({load.errors} errors)")
    return result


@dataclass
class PostLatency:
    p50: list[float]
    p99: list[float]
    rps: list[float]
    errors: int


def bench_post_sessions(
    client: LoadClient, port: int, tokens: Sequence[str], args: argparse.Namespace
) -> PostLatency:
    # timeout 0: the matchmaker settles each request as failed at once (there are no
    # peers), so nothing is left pending to be rematched during the next phase.
    body = {"workers": 1, "timeout": 0, "runtime": RUNTIME}
    reqs = [
        http_request("POST", port, "/v1/sessions", tokens[i % len(tokens)], body)
        for i in range(args.connections)
    ]
    result = PostLatency([], [], [], 0)
    for rep in range(args.repeats):
        load = client.run(port, reqs, args.duration, record=True)
        p50, p99 = percentile(load.latencies_ms, 50), percentile(load.latencies_ms, 99)
        result.p50.append(p50)
        result.p99.append(p99)
        result.rps.append(load.rps)
        result.errors += load.errors
        say(
            f"  repeat {rep + 1}: {load.rps:6.0f} req/s, p50 {p50:6.2f} ms, p99 {p99:6.2f} ms"
            f" ({len(load.latencies_ms)} requests, {load.errors} errors)"
        )
    return result


def wait_queue_empty(conn: redis.Redis, timeout: float = 90.0) -> None:
    """Wait until the matchmaker has consumed every queued job."""
    queue = match_queue(conn)
    deadline = time.monotonic() + timeout
    while queue.count or queue.started_job_registry.count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"matchmaker queue still has {queue.count} jobs")
        time.sleep(0.2)


@dataclass
class Matched:
    """Request-to-matched samples (ms).

    ``server`` is the session's ``updatedAt - createdAt`` (the API's insert to the start
    of the matchmaker's successful attempt). ``late`` is, for each sample, how long after
    that attempt began the client sent its first long-poll (positive: the session may
    already have been matched when the long-poll started).
    """

    wall: list[float] = field(default_factory=list)
    server: list[float] = field(default_factory=list)
    polls: list[int] = field(default_factory=list)
    late: list[float] = field(default_factory=list)
    budget_hit: bool = False


def bench_matched(
    api: Api, peer_token: str, token: str, n: int, *, wait: float, budget: float, warmup: int = 3
) -> Matched:
    """Wall time from POST /v1/sessions to the long-poll answering ``matched``, as the
    demo's client does it; stops early after ``budget`` seconds."""
    result = Matched()
    started = last_beat = time.monotonic()
    for i in range(warmup + n):
        if time.monotonic() - started > budget:
            result.budget_hit = True
            break
        if time.monotonic() - last_beat > 10:  # stay fresh: stale peers are not matched
            api.call("POST", "/v1/users/me/heartbeat", peer_token)
            last_beat = time.monotonic()
        t0 = time.perf_counter()
        created = api.call(
            "POST", "/v1/sessions", token, json={"workers": 1, "timeout": 30, "runtime": RUNTIME}
        )
        session = created.json()
        location = created.headers["Location"]
        polls = 0
        first_poll = time.time()
        while session["status"] == "pending":
            session = api.call("GET", location, token, params={"wait": wait}).json()
            polls += 1
        elapsed = 1000 * (time.perf_counter() - t0)
        if session["status"] != "matched":
            raise RuntimeError(f"session ended {session['status']}, not matched")
        api.call("DELETE", location, token)
        if i >= warmup:
            result.wall.append(elapsed)
            result.server.append(1000 * (session["updatedAt"] - session["createdAt"]))
            result.polls.append(polls)
            result.late.append(1000 * (first_poll - session["updatedAt"]))
    return result


def _load_peers(conn: redis.Redis, n: int, bucket: str, now: float, chunk: int = 5000) -> None:
    """What ``Registry.announce`` writes for ``n`` peers of one slot each, pipelined."""
    runtime = json.dumps(RUNTIME, sort_keys=True)
    conn.set(keys.EPOCH, repr(now))
    conn.sadd(keys.BUCKETS, bucket)
    for first in range(0, n, chunk):
        ids = [f"peer{i:06d}" for i in range(first, min(n, first + chunk))]
        pipe = conn.pipeline(transaction=False)
        for uid in ids:
            pipe.hset(
                keys.peer(uid),
                mapping={
                    "total": 1,
                    "held": 0,
                    "address": f"{uid}:7000",
                    "pubKey": "k",
                    "runtime": runtime,
                    "bucket": bucket,
                    # proven (as a probe records it), so released slots return to the index
                    "subject": "s",
                    "proof": "s",
                    "probe": "s",
                    "probeState": "proven",
                },
            )
        pipe.zadd(keys.HEARTBEATS, dict.fromkeys(ids, now))
        pipe.zadd(keys.free(bucket), dict.fromkeys(ids, 1))
        pipe.execute()


@dataclass
class Reserve:
    """Per repeat, median µs per reserve for each peer count, and of a PING."""

    sizes: dict[int, list[float]]
    ping: list[float]


def bench_reserve(sizes: Sequence[int], repeats: int, reserves: int) -> Reserve:
    """Time ``Registry.reserve`` of 10 slots among each number of available peers.

    Each peer count lives in its own database of one private redis-server, and the
    sizes take turns call by call, so drift and noise hit them alike. Each reservation
    is released (untimed) before the next, so every one sees the same free peers. A
    PING on the same connection gives the round trip that every call includes.
    """
    bucket = runtime_bucket(RUNTIME)
    result = Reserve({n: [] for n in sizes}, [])
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as tmp:
        sock = Path(tmp) / "redis.sock"
        proc = start_redis(sock)
        try:
            registries: dict[int, Registry] = {}
            now = time.time()
            for db, n in enumerate(sizes):
                conn = redis.Redis(unix_socket_path=str(sock), db=db)
                conn.flushdb()
                t0 = time.perf_counter()
                _load_peers(conn, n, bucket, now)
                say(f"  loaded {n:,} peers in {time.perf_counter() - t0:.1f} s ({conn.dbsize():,} keys)")
                registries[n] = Registry(conn, stale_after=3600)
            ping_conn = registries[sizes[0]].conn
            for rep in range(repeats):
                samples: dict[int, list[float]] = {n: [] for n in sizes}
                pings: list[float] = []
                for i in range(reserves + 20):
                    for n in sizes if i % 2 == 0 else list(sizes)[::-1]:
                        registry = registries[n]
                        sid = uuid.uuid4().hex
                        t0 = time.perf_counter_ns()
                        got = registry.reserve(
                            sid, requester="requester", buckets=[bucket], need=10, minimum=10
                        )
                        elapsed = (time.perf_counter_ns() - t0) / 1000
                        if sum(got.values()) != 10 or len(got) != 10:
                            raise RuntimeError(f"reserve among {n} peers gave {got}")
                        registry.release(sid)
                        if i >= 20:  # the first calls warm up connections and scripts
                            samples[n].append(elapsed)
                    t0 = time.perf_counter_ns()
                    ping_conn.ping()
                    pings.append((time.perf_counter_ns() - t0) / 1000)
                for n in sizes:
                    result.sizes[n].append(statistics.median(samples[n]))
                result.ping.append(statistics.median(pings))
                say(
                    f"  repeat {rep + 1}: "
                    + ", ".join(f"{n:,} peers {result.sizes[n][-1]:.1f} µs" for n in sizes)
                    + f" per reserve (median); PING {result.ping[-1]:.1f} µs"
                )
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return result


# -- report ---------------------------------------------------------------------------


def machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    uname = subprocess.run(["uname", "-srm"], capture_output=True, text=True, check=False).stdout.strip()
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "uname": uname or platform.platform(),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
    }


def _check(ok: bool) -> str:
    return "met" if ok else "MISSED"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench_api", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per load run (default 3)")
    parser.add_argument("--connections", type=int, default=32, help="concurrent connections (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of each measurement (default 3)")
    parser.add_argument(
        "--client-processes", type=int, default=2, help="load generator processes (default 2)"
    )
    parser.add_argument("--matches", type=int, default=50, help="request-to-matched samples (default 50)")
    parser.add_argument(
        "--reserves", type=int, default=300, help="reserves per repeat and size (default 300)"
    )
    parser.add_argument("--peers", type=int, default=100_000, help="the large peer count (default 100,000)")
    parser.add_argument("--wait", type=float, default=10, help="long-poll ?wait= seconds (default 10)")
    parser.add_argument(
        "--matched-budget", type=float, default=90, help="seconds at most for request-to-matched (default 90)"
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    info = machine()
    say(f"Compute Broker benchmark, {info['date']}")
    say(f"{info['uname']}; {info['cpu']}; {info['cores']} cores; Python {info['python']}")

    # The stack gets its own Redis and SQLite file, whatever this shell points at.
    env = {"SCRYPT_N": str(SCRYPT_N), "REDIS_URL": "", "DATABASE_URL": "", "TOKEN_KEYS": ""}
    client = LoadClient(max(1, min(args.client_processes, args.connections)))
    hello: HelloWeb | None = None
    try:
        with LocalStack(matchmakers=1, env=env) as stack:
            hello_port = free_port()
            hello = HelloWeb({**stack.env, "PORT": str(hello_port)}, stack.data_dir)
            wait_http(f"http://127.0.0.1:{hello_port}{ME_PATH}", timeout=60, proc=hello)
            web_line = procfile()["web"]
            say(f"web: {web_line}")
            say(
                f"     WEB_CONCURRENCY={stack.env.get('WEB_CONCURRENCY', '2 (default)')}, "
                f"WEB_THREADS={stack.env.get('WEB_THREADS', '16 (default)')}; hello: {hello.command}"
            )
            say(
                f"client: {args.connections} keep-alive connections, raw-socket HTTP/1.1 in threads over "
                f"{client.processes} processes (wrk not installed), on the same cores as the servers"
            )
            say(f"sign-ups use SCRYPT_N={SCRYPT_N} (fast password hashing for set-up only)")

            api = Api(stack.url)
            accounts = [api.signup(f"requester{i}@example.org", 7100 + i) for i in range(args.connections)]
            tokens = [a["token"] for a in accounts]
            peer_key = ed25519.Ed25519PrivateKey.generate()
            peer = api.signup("peer@example.org", answer_probes(peer_key), peer_key)

            say(f"\n1. GET {ME_PATH} throughput, ours vs Falcon hello world ({args.duration:g} s runs)")
            tput = bench_throughput(client, stack.port, hello_port, tokens, args)

            say(
                f"\n2. POST /v1/sessions latency at {args.connections} connections ({args.duration:g} s runs)"
            )
            post = bench_post_sessions(client, stack.port, tokens, args)

            conn = redis.Redis.from_url(Settings.from_env(stack.env).redis_url)
            wait_queue_empty(conn)
            conn.close()
            say(
                f"\n3. request to matched, 1 worker, {args.matches} samples, ?wait={args.wait:g}"
                " (one peer offering 64 slots)"
            )
            api.call("POST", "/v1/users/me/jobs", peer["token"], json={"jobs": 64, "runtime": RUNTIME})
            matched = bench_matched(
                api, peer["token"], tokens[0], args.matches, wait=args.wait, budget=args.matched_budget
            )
            wall = matched.wall
            stalls = [i for i, w in enumerate(wall) if w > 1000 * args.wait / 2]
            say(
                f"  p50 {percentile(wall, 50):.1f} ms, p90 {percentile(wall, 90):.1f} ms,"
                f" max {max(wall):.1f} ms; created-to-matched on the server"
                f" p50 {percentile(matched.server, 50):.1f} ms"
            )
            if matched.budget_hit:
                say(f"  stopped after {len(wall)} samples: time budget of {args.matched_budget:g} s spent")
            for i in stalls:
                say(
                    f"  stall: {wall[i]:.0f} ms in {matched.polls[i]} long-poll(s); matched"
                    f" {matched.server[i]:.0f} ms after creation; first long-poll sent"
                    f" {matched.late[i]:+.1f} ms after the matchmaker's attempt began"
                )
            fast = [w for i, w in enumerate(wall) if i not in stalls]
            if stalls and fast:
                say(f"  without the {len(stalls)} stalls: p50 {percentile(fast, 50):.1f} ms")
            hello.stop()
            hello = None
    finally:
        if hello is not None:
            hello.stop()
        client.close()

    sizes = [100, args.peers]
    say(f"\n4. Registry.reserve of 10 slots among {sizes[0]:,} vs {sizes[1]:,} peers (private redis-server)")
    reserve = bench_reserve(sizes, args.repeats, args.reserves)

    # -- summary
    med: Callable[[list[float]], float] = statistics.median
    ours, hello_rps = med(tput.ours), med(tput.hello)
    tput_ratio = ours / hello_rps
    p50, p99 = med(post.p50), med(post.p99)
    m50 = percentile(matched.wall, 50)
    small, big = med(reserve.sizes[sizes[0]]), med(reserve.sizes[sizes[1]])
    r_ratio = big / small
    same = 0.8 <= r_ratio <= 1.25

    say(f"\nResults (medians over {args.repeats} repeats; {time.monotonic() - started:.0f} s in all)\n")
    say(
        f"Measured {info['date']} on {info['uname']}, {info['cpu']}, {info['cores']} cores; "
        f"client and servers share the cores.\n"
    )
    rows = [
        ("figure", "ours", "comparison", "ratio", "target"),
        (
            f"`GET {ME_PATH}` (authenticated), gunicorn gthread",
            f"{ours:,.0f} req/s",
            f"{hello_rps:,.0f} req/s (Falcon hello world, same gunicorn)",
            f"{tput_ratio:.2f}",
            "≥ 0.5",
        ),
        (
            f"`POST /v1/sessions` latency, {args.connections} connections",
            f"p50 {p50:.1f} ms, p99 {p99:.1f} ms",
            f"at {med(post.rps):,.0f} req/s: mean ≈ {args.connections / med(post.rps) * 1000:.0f} ms"
            " by Little's law",
            "",
            "p99 < 20 ms",
        ),
        (
            "request → matched, 1 worker, p50",
            f"{m50:.1f} ms",
            f"p90 {percentile(matched.wall, 90):.0f} ms; {len(stalls)}/{len(matched.wall)} waited"
            f" out the {args.wait:g} s long-poll",
            "",
            "< 50 ms",
        ),
        (
            f"`Registry.reserve` of 10 slots among {sizes[1]:,} peers",
            f"{big:.0f} µs",
            f"{small:.0f} µs among {sizes[0]:,} peers (PING {med(reserve.ping):.0f} µs)",
            f"{r_ratio:.2f}",
            "same within noise (0.8-1.25)",
        ),
    ]
    for i, row in enumerate(rows):
        say("| " + " | ".join(row) + " |")
        if i == 0:
            say("|" + "|".join("---" for _ in row) + "|")
    say("")
    say(
        f"throughput ratio ≥ 0.5: {_check(tput_ratio >= 0.5)}; POST p99 < 20 ms: {_check(p99 < 20)}; "
        f"matched p50 < 50 ms: {_check(m50 < 50)}; reserve same within noise: {_check(same)}"
    )
    if tput.errors or post.errors:
        say(f"errors: {tput.errors} in throughput runs, {post.errors} in POST runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
