"""Benchmark of the requester library: ``python -m scripts.bench_peer [--quick]``.

One run starts the broker stack (`scripts.stack.LocalStack`), two local peer daemons
with one slot each and a requester account, then measures four figures of
``peer.pool.Pool(2)`` against what a user would otherwise reach for, on this machine:

1. ``map`` throughput: 100,000 trivial items (``inc(x) = x + 1``), items/s. Our map
   sends chunks of items as single tasks; so does ``ProcessPoolExecutor.map`` with a
   chunksize (the same rule: about 4 chunks per worker); Dask's ``client.map`` makes
   one task per item, which is what its users write.
2. ``submit`` throughput: 10,000 individual no-op tasks, all submitted, then all
   awaited, tasks/s. This is the per-task overhead of the whole path (serialize,
   frame, TLS, the daemon, the sandboxed slot process, and back).
3. Round-trip latency: 500 sequential ``submit(noop).result()``, p50 and p99 in ms.
4. A 100 MB numpy array there and back (``submit(identity, arr).result()``), MB/s
   counted as 200 MB moved over the elapsed seconds; Dask scatters the array to a
   worker, runs ``identity`` there and gathers the result (both ``direct=True``).
   The ceiling is a raw TLS 1.3 loopback: the same 100 MB through a Python ``ssl``
   socket pair on 127.0.0.1 and back, with a self-signed P-256 certificate like the
   peers' and large ``sendall``/``recv_into`` buffers.

The comparisons are Dask distributed (``LocalCluster(n_workers=2,
threads_per_worker=1, processes=True)`` + ``Client``), ``ProcessPoolExecutor(2)`` and
the raw TLS transfer. Everything is measured side by side in the same run, rounds of
each figure alternating between the systems, because the machine is small (2 cores)
and noisy: absolute numbers move from run to run, ratios measured minutes apart on
the same machine much less. Throughputs are medians over repeats; latency
percentiles pool the samples of every round. For our pool the CPU seconds spent by
the requester, the peer daemons and their sandboxed slot processes are recorded per
phase, which tells where time goes without a profiler; ``--profile`` adds cProfile
listings of the requester's main thread and reader threads for ``map`` and
``submit``.

The peers run with ``--memory 4096 --task-timeout 120`` so the 100 MB round trip fits
their sandboxes; the stack uses ``SCRYPT_N=1024`` so creating accounts is quick. Every
process started here is stopped at the end, and the run checks that none is left.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import cProfile
import datetime as dt
import gc
import io
import math
import os
import platform
import pstats
import resource
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scripts.stack import LocalStack, Peer, init_account

PASSWORD = "bench password, not a secret"
#: Room for the 100 MB array (twice) in each sandbox, and time to move it.
PEER_LIMITS = ("--memory", "4096", "--task-timeout", "120")
SYSTEMS = ("ours", "dask", "ppe", "tls")
LABELS = {"ours": "ours", "dask": "Dask", "ppe": "ProcessPool", "tls": "raw TLS"}
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- the functions every system runs (module level, stdlib only: they travel by value) --


def inc(x: int) -> int:
    return x + 1


def noop(*args: object) -> None:
    return None


def identity(x: Any) -> Any:
    return x


# -- sizes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    map_items: int
    submits: int
    rtts: int
    array_bytes: int
    map_rounds: int
    submit_rounds: int
    rtt_rounds: int
    array_rounds: int
    budget: float  # seconds one system may spend on one figure before skipping rounds


FULL = Sizes(100_000, 10_000, 500, 100_000_000, 3, 3, 3, 5, 25.0)
QUICK = Sizes(20_000, 2_000, 200, 100_000_000, 1, 1, 1, 2, 10.0)


# -- process bookkeeping ----------------------------------------------------------------


def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds so far) for every process we can read."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        table[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return table


def _descendants(table: dict[int, tuple[int, float]], root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


@dataclass
class CpuSample:
    wall: float
    requester: float
    daemons: float
    sandboxes: float


class CpuMeter:
    """CPU seconds of this process and of the peer daemons and their slot processes,
    summed per named phase (from /proc, so in clock ticks: 10 ms resolution)."""

    def __init__(self, daemon_pids: Sequence[int]) -> None:
        self.daemon_pids = list(daemon_pids)
        self.seen: set[int] = set()  # every sandbox pid ever seen, checked at the end
        self.totals: dict[str, tuple[str, list[float]]] = {}  # name -> unit, [units, wall, 3 CPUs]

    def sample(self) -> CpuSample:
        table = _proc_table()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        daemons = sandboxes = 0.0
        for pid in self.daemon_pids:
            daemons += table.get(pid, (0, 0.0))[1]
            for child in _descendants(table, pid):
                self.seen.add(child)
                sandboxes += table[child][1]
        return CpuSample(time.perf_counter(), usage.ru_utime + usage.ru_stime, daemons, sandboxes)

    @contextlib.contextmanager
    def phase(self, name: str, units: int, unit: str) -> Iterator[None]:
        before = self.sample()
        yield
        after = self.sample()
        _, acc = self.totals.setdefault(name, (unit, [0.0] * 5))
        deltas = (
            units,
            after.wall - before.wall,
            after.requester - before.requester,
            after.daemons - before.daemons,
            after.sandboxes - before.sandboxes,
        )
        for i, value in enumerate(deltas):
            acc[i] += value

    def lines(self) -> list[str]:
        out = []
        for name, (unit, (units, wall, *cpu)) in self.totals.items():
            parts = dict(zip(("requester", "daemons", "slots"), cpu, strict=True))
            scale, label = (1e3, "ms") if units < 100 else (1e6, "µs")
            per = ", ".join(f"{k} {scale * v / units:,.1f}" for k, v in parts.items())
            busy = ", ".join(f"{k} {100 * v / wall:.0f}%" for k, v in parts.items())
            out.append(f"{name}: wall {wall:.2f} s; CPU {label} per {unit}: {per}; busy: {busy}")
        return out


# -- the broker stack and the peers -----------------------------------------------------


# -- one measurement per system and figure ----------------------------------------------


def _chunksize(items: int, workers: int = 2) -> int:
    return max(1, math.ceil(items / (workers * 4)))


class Ours:
    name = "ours"

    def __init__(self, pool: Any, meter: CpuMeter) -> None:
        self.pool, self.meter = pool, meter

    def warm(self, arr: np.ndarray) -> None:
        self.pool.submit(noop).result()
        assert list(self.pool.map(inc, range(100))) == list(range(1, 101))
        assert self.pool.submit(identity, arr[:1000]).result().shape == (1000,)

    def map(self, n: int) -> float:
        with self.meter.phase(f"map of {n:,}", n, "item"):
            t = time.perf_counter()
            out = list(self.pool.map(inc, range(n)))
            elapsed = time.perf_counter() - t
        assert out[-1] == n
        return n / elapsed

    def submit(self, n: int) -> float:
        with self.meter.phase(f"{n:,} submits", n, "task"):
            t = time.perf_counter()
            futures = [self.pool.submit(noop) for _ in range(n)]
            for fut in futures:
                fut.result()
            elapsed = time.perf_counter() - t
        return n / elapsed

    def rtt(self, n: int) -> list[float]:
        samples = []
        with self.meter.phase(f"{n} round trips", n, "round trip"):
            for _ in range(n):
                t = time.perf_counter()
                self.pool.submit(noop).result()
                samples.append(time.perf_counter() - t)
        return samples

    def array(self, arr: np.ndarray) -> tuple[float, np.ndarray]:
        with self.meter.phase(f"{arr.nbytes / 1e6:,.0f} MB there and back", 1, "transfer"):
            t = time.perf_counter()
            out = self.pool.submit(identity, arr).result()
            elapsed = time.perf_counter() - t
        return elapsed, out


class Dask:
    name = "dask"

    def __init__(self) -> None:
        import logging

        from distributed import Client, LocalCluster

        self.cluster = LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        )
        self.client = Client(self.cluster)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()
        with contextlib.suppress(Exception):
            self.cluster.close()

    def warm(self, arr: np.ndarray) -> None:
        self.client.submit(noop, pure=False).result()
        assert self.client.gather(self.client.map(inc, range(100), pure=False)) == list(range(1, 101))
        self.array(arr[:1000])

    def map(self, n: int) -> float:
        t = time.perf_counter()
        futures = self.client.map(inc, range(n), pure=False)
        out = self.client.gather(futures)
        elapsed = time.perf_counter() - t
        assert out[-1] == n
        del futures
        return n / elapsed

    def submit(self, n: int) -> float:
        t = time.perf_counter()
        futures = [self.client.submit(noop, pure=False) for _ in range(n)]
        self.client.gather(futures)
        elapsed = time.perf_counter() - t
        del futures
        return n / elapsed

    def rtt(self, n: int) -> list[float]:
        samples = []
        for _ in range(n):
            t = time.perf_counter()
            self.client.submit(noop, pure=False).result()
            samples.append(time.perf_counter() - t)
        return samples

    def array(self, arr: np.ndarray) -> tuple[float, np.ndarray]:
        t = time.perf_counter()
        remote = self.client.scatter(arr, direct=True, hash=False)
        result = self.client.submit(identity, remote, pure=False)
        out = self.client.gather(result, direct=True)
        elapsed = time.perf_counter() - t
        del remote, result
        return elapsed, out


class PPE:
    name = "ppe"

    def __init__(self) -> None:
        self.ex = concurrent.futures.ProcessPoolExecutor(2)

    def close(self) -> None:
        self.ex.shutdown(wait=True, cancel_futures=True)

    def warm(self, arr: np.ndarray) -> None:
        list(self.ex.map(noop, range(4)))  # starts both workers
        self.array(arr[:1000])

    def map(self, n: int) -> float:
        t = time.perf_counter()
        out = list(self.ex.map(inc, range(n), chunksize=_chunksize(n)))
        elapsed = time.perf_counter() - t
        assert out[-1] == n
        return n / elapsed

    def submit(self, n: int) -> float:
        t = time.perf_counter()
        futures = [self.ex.submit(noop) for _ in range(n)]
        for fut in futures:
            fut.result()
        return n / (time.perf_counter() - t)

    def rtt(self, n: int) -> list[float]:
        samples = []
        for _ in range(n):
            t = time.perf_counter()
            self.ex.submit(noop).result()
            samples.append(time.perf_counter() - t)
        return samples

    def array(self, arr: np.ndarray) -> tuple[float, np.ndarray]:
        t = time.perf_counter()
        out = self.ex.submit(identity, arr).result()
        return time.perf_counter() - t, out


class RawTLS:
    """An echo over one TLS 1.3 connection on 127.0.0.1: a server thread receives the
    whole array, then sends it back; the client times send + receive."""

    name = "tls"

    def __init__(self, nbytes: int, workdir: Path) -> None:
        cert, key = _self_signed(workdir)
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        server_ctx.load_cert_chain(cert, key)
        client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        client_ctx.check_hostname = False
        client_ctx.load_verify_locations(cert)
        listener = socket.create_server(("127.0.0.1", 0))
        self.nbytes = nbytes
        self._server_buf = memoryview(bytearray(nbytes))
        self._server: ssl.SSLSocket | None = None
        ready = threading.Event()

        def serve() -> None:
            sock, _ = listener.accept()
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._server = server_ctx.wrap_socket(sock, server_side=True)
            ready.set()
            while True:
                if _recv_into(self._server, self._server_buf) < nbytes:
                    return
                self._server.sendall(self._server_buf)

        self._thread = threading.Thread(target=serve, name="raw-tls-echo", daemon=True)
        self._thread.start()
        raw = socket.create_connection(listener.getsockname())
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client = client_ctx.wrap_socket(raw)
        ready.wait(10)
        listener.close()
        self.version, self.cipher = self.client.version(), self.client.cipher()[0]

    def array(self, arr: np.ndarray) -> tuple[float, np.ndarray]:
        out = np.empty_like(arr)
        t = time.perf_counter()
        self.client.sendall(memoryview(arr).cast("B"))
        got = _recv_into(self.client, memoryview(out).cast("B"))
        elapsed = time.perf_counter() - t
        assert got == arr.nbytes
        return elapsed, out

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.client.close()
        self._thread.join(5)
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._server.close()


def _recv_into(sock: ssl.SSLSocket, view: memoryview) -> int:
    pos = 0
    while pos < view.nbytes:
        n = sock.recv_into(view[pos:])
        if n == 0:
            break
        pos += n
    return pos


def _self_signed(workdir: Path) -> tuple[Path, Path]:
    """A self-signed P-256 certificate, the peers' own kind (`peer.identity`), as PEM files."""
    from peer.identity import Identity

    identity = Identity.create(workdir / "raw-tls")
    return identity.cert_path, identity.key_path


# -- running rounds and collecting figures ----------------------------------------------


@dataclass
class Figures:
    map: dict[str, list[float]] = field(default_factory=dict)
    submit: dict[str, list[float]] = field(default_factory=dict)
    rtt: dict[str, list[float]] = field(default_factory=dict)
    array: dict[str, list[float]] = field(default_factory=dict)


def _rounds(
    systems: Sequence[Any], rounds: int, budget: float, run: Callable[[Any], None], title: str
) -> None:
    """Run ``run`` for each system, ``rounds`` times, alternating systems and rotating
    their order; a system that used up ``budget`` seconds skips its later rounds."""
    spent = dict.fromkeys((s.name for s in systems), 0.0)
    for r in range(rounds):
        order = list(systems[r % len(systems) :]) + list(systems[: r % len(systems)]) if systems else []
        for system in order:
            if r and spent[system.name] > budget:
                continue
            gc.collect()
            t = time.perf_counter()
            run(system)
            spent[system.name] += time.perf_counter() - t
    print(f"  ({title}: {', '.join(f'{LABELS[k]} {v:.1f} s' for k, v in spent.items())})", flush=True)


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _med(values: list[float] | None) -> float | None:
    return statistics.median(values) if values else None


def _pct(values: list[float] | None, q: float) -> float | None:
    return float(np.percentile(np.array(values) * 1000, q)) if values else None


def measure(systems: list[Any], tls: RawTLS | None, sizes: Sizes, arr: np.ndarray) -> Figures:
    fig = Figures()
    pools = [s for s in systems if s.name != "tls"]

    print(f"\nmap over {sizes.map_items:,} items of inc(x) = x + 1, items/s:", flush=True)

    def do_map(s: Any) -> None:
        fig.map.setdefault(s.name, []).append(s.map(sizes.map_items))
        print(f"  {LABELS[s.name]:<12} {fig.map[s.name][-1]:>14,.0f}", flush=True)

    _rounds(pools, sizes.map_rounds, sizes.budget, do_map, "time spent")

    print(f"\n{sizes.submits:,} submits of a no-op, then wait for all, tasks/s:", flush=True)

    def do_submit(s: Any) -> None:
        fig.submit.setdefault(s.name, []).append(s.submit(sizes.submits))
        print(f"  {LABELS[s.name]:<12} {fig.submit[s.name][-1]:>14,.0f}", flush=True)

    _rounds(pools, sizes.submit_rounds, sizes.budget, do_submit, "time spent")

    print(f"\n{sizes.rtts} sequential round trips of a no-op, ms (p50 / p99 of the round):", flush=True)

    def do_rtt(s: Any) -> None:
        samples = s.rtt(sizes.rtts)
        fig.rtt.setdefault(s.name, []).extend(samples)
        print(f"  {LABELS[s.name]:<12} {_pct(samples, 50):>8.3f} / {_pct(samples, 99):.3f}", flush=True)

    _rounds(pools, sizes.rtt_rounds, sizes.budget, do_rtt, "time spent")

    mb = arr.nbytes / 1e6
    print(f"\n{mb:,.0f} MB numpy array there and back, MB/s ({2 * mb:,.0f} MB / seconds):", flush=True)

    def do_array(s: Any) -> None:
        elapsed, out = s.array(arr)
        if out.shape != arr.shape or out[::4096].tobytes() != arr[::4096].tobytes():
            raise AssertionError(f"{s.name}: the array came back different")
        del out
        fig.array.setdefault(s.name, []).append(2 * mb / elapsed)
        print(f"  {LABELS[s.name]:<12} {fig.array[s.name][-1]:>10,.0f}   ({elapsed:.3f} s)", flush=True)

    _rounds(pools + ([tls] if tls else []), sizes.array_rounds, sizes.budget, do_array, "time spent")
    return fig


# -- profiling ---------------------------------------------------------------------------


def profile_ours(pool_factory: Callable[[], Any], sizes: Sizes) -> None:
    """cProfile the requester (main thread and the pool's reader threads) during one
    ``map`` and one batch of ``submit``, each on a fresh pool."""
    from peer.pool import Pool

    original = Pool._reader
    for label, work in (
        (f"map of {sizes.map_items:,}", lambda p: list(p.map(inc, range(sizes.map_items)))),
        (
            f"{sizes.submits:,} submits",
            lambda p: [f.result() for f in [p.submit(noop) for _ in range(sizes.submits)]],
        ),
    ):
        readers: list[cProfile.Profile] = []
        threads: list[threading.Thread] = []

        def reader(self: Any, link: Any, _readers: list = readers, _threads: list = threads) -> None:
            prof = cProfile.Profile()
            _readers.append(prof)
            _threads.append(threading.current_thread())
            prof.enable()
            try:
                original(self, link)
            finally:
                prof.disable()

        Pool._reader = reader  # type: ignore[method-assign]
        try:
            pool = pool_factory()
            try:
                pool.submit(noop).result()
                main = cProfile.Profile()
                main.enable()
                work(pool)
                main.disable()
            finally:
                pool.shutdown()
        finally:
            Pool._reader = original  # type: ignore[method-assign]
        for thread in threads:
            thread.join(5)
        print(f"\n== cProfile, requester main thread, {label} (top by own time) ==")
        _print_stats(main)
        if readers:
            print(f"\n== cProfile, requester reader threads (both links), {label} ==")
            _print_stats(*readers)


def _print_stats(*profiles: cProfile.Profile, top: int = 18) -> None:
    out = io.StringIO()
    stats = pstats.Stats(profiles[0], stream=out)
    for extra in profiles[1:]:
        stats.add(extra)
    stats.strip_dirs().sort_stats("tottime").print_stats(top)
    lines = out.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if "function calls" in line), 0)
    print("\n".join(line for line in lines[start:] if line.strip()))


# -- the report --------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _verdict(value: float | None, bar: float, higher: bool) -> str:
    if value is None:
        return "n/a"
    return "PASS" if (value >= bar if higher else value <= bar) else "MISS"


def report(fig: Figures, sizes: Sizes, mb: float, tls: RawTLS | None) -> None:
    med = {name: {k: _med(v) for k, v in getattr(fig, name).items()} for name in ("map", "submit", "array")}
    p50 = {k: _pct(v, 50) for k, v in fig.rtt.items()}
    p99 = {k: _pct(v, 99) for k, v in fig.rtt.items()}

    def x(v: float | None, digits: int = 2) -> str:
        return "n/a" if v is None else f"{v:.{digits}f}x"

    m, s, a = med["map"], med["submit"], med["array"]
    bars = [
        ("map", "ours/Dask", _ratio(m.get("ours"), m.get("dask")), 10.0, True, ">= 10x"),
        ("submit", "ours/Dask", _ratio(s.get("ours"), s.get("dask")), 3.0, True, ">= 3x"),
        ("rtt p50", "ours/Dask", _ratio(p50.get("ours"), p50.get("dask")), 0.5, False, "<= 0.5x"),
        ("100 MB", "ours/raw TLS", _ratio(a.get("ours"), a.get("tls")), 0.5, True, ">= 0.5x"),
    ]
    goals = [
        ("map", "ours/ProcessPool", _ratio(m.get("ours"), m.get("ppe")), 0.5, True, ">= 0.5x"),
        ("submit", "ours/ProcessPool", _ratio(s.get("ours"), s.get("ppe")), 0.5, True, ">= 0.5x"),
        ("rtt p50", "ours/ProcessPool", _ratio(p50.get("ours"), p50.get("ppe")), None, False, ""),
        ("100 MB", "ours/ProcessPool", _ratio(a.get("ours"), a.get("ppe")), None, True, ""),
    ]
    print("\nRatios against the bars (medians; rtt from all samples):")
    for what, pair, value, bar, higher, text in bars:
        print(f"  {what:<8} {pair:<14} = {x(value):>8}   bar {text:<8} {_verdict(value, bar, higher)}")
    print("Ours vs ProcessPoolExecutor (where we're headed):")
    rtt_ms = p50.get("ours")
    vs_dask = _ratio(a.get("ours"), a.get("dask"))
    for what, pair, value, bar, higher, text in goals:
        line = f"  {what:<8} {pair:<18} = {x(value):>8}"
        if what == "rtt p50":
            line += f"   goal ours p50 <= 1 ms: {_fmt(rtt_ms, 3)} ms {_verdict(rtt_ms, 1.0, False)}"
        elif what == "100 MB":
            line += f"   goal ours >= Dask: ours/Dask = {x(vs_dask)} {_verdict(vs_dask, 1.0, True)}"
        else:
            line += f"   goal {text:<8} {_verdict(value, bar, higher)}"  # type: ignore[arg-type]
        print(line)

    def cell(d: dict[str, float | None], k: str, digits: int = 0) -> str:
        return _fmt(d.get(k), digits)

    def row(figure: str, d: dict[str, float | None], digits: int, ratio: str, bar: str) -> str:
        cells = [cell(d, k, digits) for k in SYSTEMS]
        return f"| {figure} | {' | '.join(cells)} | {ratio} | {bar} |"

    goal = {g[0]: g for g in goals}
    print("\n| figure | ours | Dask | ProcessPool | raw TLS | ratio vs first bar | bar |")
    print("|---|---:|---:|---:|---:|---:|---|")
    print(
        row(
            f"map {sizes.map_items:,} items, items/s",
            m,
            0,
            f"{x(bars[0][2], 1)} Dask",
            f">= 10x Dask: {_verdict(bars[0][2], 10, True)}; "
            f"goal >= 0.5x ProcessPool: {x(goal['map'][2])} {_verdict(goal['map'][2], 0.5, True)}",
        )
    )
    print(
        row(
            f"{sizes.submits:,} submits, tasks/s",
            s,
            0,
            f"{x(bars[1][2], 1)} Dask",
            f">= 3x Dask: {_verdict(bars[1][2], 3, True)}; "
            f"goal >= 0.5x ProcessPool: {x(goal['submit'][2])} {_verdict(goal['submit'][2], 0.5, True)}",
        )
    )
    print(
        row(
            "round trip p50, ms",
            p50,
            3,
            f"{x(bars[2][2])} Dask",
            f"<= 0.5x Dask: {_verdict(bars[2][2], 0.5, False)}; goal <= 1 ms: {_verdict(rtt_ms, 1.0, False)}",
        )
    )
    print(row("round trip p99, ms", p99, 3, f"{x(_ratio(p99.get('ours'), p99.get('dask')))} Dask", "-"))
    print(
        row(
            f"{mb:,.0f} MB there and back, MB/s",
            a,
            0,
            f"{x(bars[3][2])} raw TLS",
            f">= 0.5x raw TLS: {_verdict(bars[3][2], 0.5, True)}; "
            f"goal >= Dask: {x(vs_dask)} {_verdict(vs_dask, 1.0, True)}",
        )
    )
    print()
    _system_lines(sizes, tls)


def _system_lines(sizes: Sizes, tls: RawTLS | None) -> None:
    uname = subprocess.run(["uname", "-srm"], capture_output=True, text=True).stdout.strip()
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    versions = [f"Python {platform.python_version()}", f"numpy {np.__version__}"]
    with contextlib.suppress(ImportError):
        import dask
        import distributed

        versions += [f"dask {dask.__version__}", f"distributed {distributed.__version__}"]
    print(f"Date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"System: {uname}; CPU: {cpu}; {os.cpu_count()} cores")
    print(f"Software: {', '.join(versions)}")
    rounds = (
        f"rounds: map {sizes.map_rounds}, submit {sizes.submit_rounds}, rtt {sizes.rtt_rounds}, "
        f"array {sizes.array_rounds} (fewer for a system past {sizes.budget:.0f} s on a figure)"
    )
    tls_text = f"; raw TLS: {tls.version} {tls.cipher}" if tls else ""
    print(f"Method: medians over rounds, systems alternating; {rounds}{tls_text}")


# -- main -------------------------------------------------------------------------------


def _leftovers(own: int, roots: Sequence[int], sandboxes: set[int]) -> list[str]:
    """Processes we started that are still running (besides multiprocessing's
    resource tracker, which exits with us)."""
    table = _proc_table()
    left = set(_descendants(table, own))
    for pid in (*roots, *sandboxes):
        if pid in table:
            left.add(pid)
            left |= _descendants(table, pid)
    out = []
    for pid in sorted(left):
        cmd = _cmdline(pid)
        if cmd and "resource_tracker" not in cmd:
            out.append(f"{pid} {cmd[:120]}")
    return out


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM (e.g. from ``timeout``) unwinds through the cleanup like Ctrl-C."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench_peer", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, one round (about a minute)")
    parser.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"comma-separated subset of {','.join(SYSTEMS)} (default: all)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="also cProfile our requester during map and submit"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory with the logs")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    chosen = [s for s in args.systems.split(",") if s]
    unknown = set(chosen) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown system(s): {', '.join(sorted(unknown))}")

    signal.signal(signal.SIGTERM, _interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="bench-peer-"))
    arr = np.random.default_rng(0).integers(0, 256, sizes.array_bytes, dtype=np.uint8)
    started = time.perf_counter()
    stack: LocalStack | None = None
    peers: list[Peer] = []
    closers: list[Callable[[], None]] = []
    systems: list[Any] = []
    tls: RawTLS | None = None
    meter = CpuMeter([])
    failed = False
    roots: list[int] = []
    try:
        if "ours" in chosen or args.profile:
            from peer.pool import Pool

            stack = LocalStack(data_dir=workdir / "stack", env={"SCRYPT_N": "1024"}).start()
            url = stack.url
            requester = workdir / "requester"
            init_account(url, requester, f"requester-{time.monotonic_ns()}@bench.example.org", PASSWORD)
            peers = [Peer(url, workdir, f"peer{n}", password=PASSWORD, extra=PEER_LIMITS) for n in range(2)]
            for peer in peers:
                peer.wait_for("serving")
            roots += [p.proc.pid for p in stack.processes] + [p.process.proc.pid for p in peers]
            meter = CpuMeter([p.process.proc.pid for p in peers])

            def make_pool() -> Any:
                return Pool(2, home=requester, broker=url, timeout=30)

            print(f"stack at {url}; peers at {', '.join(f'127.0.0.1:{p.port}' for p in peers)}", flush=True)
            if "ours" in chosen:
                pool = make_pool()
                closers.append(lambda: pool.shutdown(wait=False, cancel_futures=True))
                systems.append(Ours(pool, meter))
        if "dask" in chosen:
            dask = Dask()
            closers.append(dask.close)
            systems.append(dask)
        if "ppe" in chosen:
            ppe = PPE()
            closers.append(ppe.close)
            systems.append(ppe)
        if "tls" in chosen:
            tls = RawTLS(arr.nbytes, workdir)
            closers.append(tls.close)
        for system in systems:
            t = time.perf_counter()
            system.warm(arr)
            print(f"{LABELS[system.name]} warmed up in {time.perf_counter() - t:.2f} s", flush=True)
        fig = measure(systems, tls, sizes, arr)
        if meter.totals:
            print("\nWhere our time goes (CPU from /proc and getrusage, summed over rounds):")
            for line in meter.lines():
                print(f"  ours {line}")
        if args.profile:
            for system in systems:
                if isinstance(system, Ours):
                    system.pool.shutdown()  # its session holds both peers
            profile_ours(make_pool, sizes)
        print(f"\nTotal run time {time.perf_counter() - started:.0f} s.\n")
        report(fig, sizes, arr.nbytes / 1e6, tls)
    except BaseException:
        failed = True
        for peer in peers:
            print(f"--- {peer.process.name} log (tail) ---\n{peer.process.output()[-3000:]}", file=sys.stderr)
        raise
    finally:
        for close in reversed(closers):
            try:
                close()
            except Exception as exc:
                print(f"cleanup: {exc!r}", file=sys.stderr)
        for peer in peers:
            peer.stop()
        if stack is not None:
            stack.stop()
        time.sleep(0.5)
        left = _leftovers(os.getpid(), roots, meter.seen)
        print(f"\nProcesses left running: {'none' if not left else ''}", file=sys.stderr)
        for line in left:
            print(f"  {line}", file=sys.stderr)
        if args.keep or failed:
            print(f"logs in {workdir}", file=sys.stderr)
        else:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
