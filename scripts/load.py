"""Load the real stack, then audit it: ``python -m scripts.load [--quick]``.

Benchmarks measure one request kind at a time; this drives the whole API at once the
way many peers and requesters would, on the stack from the Procfile (gunicorn, a
matchmaker and a private Redis, started by ``LocalStack``), and then checks that the
database and the registry in Redis still agree. Races between the API and the
matchmaker (a session deleted while it is being matched, a peer that stops offering
slots while it holds some) do not show up as errors on the wire; they show up as
slots held for nobody, or members of sessions that no longer exist.

Each of ``--clients`` threads (keep-alive ``requests`` sessions) creates an account,
logs in and then runs cycles until the fixed request budget is spent: offer 2 or 0
jobs (alternating), heartbeat, request a pool of 1-2 workers with a 1-3 s timeout,
read it (sometimes long-polling with ``?wait=1``), sometimes list its sessions, and
end it. At the end every client offers 2 jobs and leaves one pool open, so the audit
also sees slots that are really held. ``--requests`` counts every request, set-up and
final ones included.

Every status and latency is recorded; any status other than the one expected (a 5xx,
an unexpected 4xx, a connection error) counts as an error. After the matchmaker has
settled every request, the audit checks:

- every account created is in the database;
- no ``Member`` row belongs to a session or account that no longer exists, and only
  matched or partial sessions have members;
- for every peer, the registry's ``held`` equals the slots of its memberships in
  matched/partial sessions, ``held >= 0``, ``total - held >= 0``, ``held <= jobs``
  and ``total == jobs``; its entry in the free index matches its free slots;
- each session's reservation in Redis equals its members, and no reservation is left
  for a session that holds nothing;
- every peer offering jobs has a proven address (each client answers the broker's
  probes), and only proven peers are in the free index;
- no matchmaker or probe job failed and no process logged a traceback.

Exit status 0 only with no errors and no inconsistencies. Passwords are hashed with
``SCRYPT_N=1024`` so that sign-ups do not dominate the run.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import random
import socket
import statistics
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from broker_api.matching import keys
from broker_api.matching.queue import match_queue, probe_queue
from broker_api.matching.registry import Registry
from broker_api.models import Member, Session, User, bind_database, db
from broker_api.settings import Settings
from peer import probe, wire
from peer.errors import PeerError
from peer.runtime import local_runtime
from scripts.stack import LocalStack

#: Requests each client makes outside its cycles: sign-up and log-in, then the final
#: offer, heartbeat and pool request.
SETUP_REQUESTS = 3  # challenge, sign-up, log-in
FINAL_REQUESTS = 3
#: How long the matchmaker may take to settle every request after the load (pools
#: time out after at most 3 s; rq's scheduler polls every second).
SETTLE_TIMEOUT = 30.0
PASSWORD = "load test password"  # throwaway accounts on a private stack


@dataclass(frozen=True)
class Sample:
    """One request's outcome: which endpoint, the status (0: no response), seconds."""

    endpoint: str
    status: int
    seconds: float
    ok: bool


@dataclass
class Recorder:
    """Samples from all client threads, plus a few examples of the errors."""

    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, sample: Sample, detail: str = "") -> None:
        with self.lock:
            self.samples.append(sample)
            if not sample.ok and len(self.errors) < 20:
                self.errors.append(detail)


class Budget:
    """The requests left for the clients' cycles, shared by every thread.

    A client takes the tickets for a whole cycle at once and returns what it cannot
    use, so the run stops at exactly the requested total and no cycle is cut between
    creating a pool and ending it.
    """

    def __init__(self, total: int) -> None:
        self._left = total
        self._lock = threading.Lock()

    def take(self, wanted: int) -> int:
        with self._lock:
            granted = min(wanted, self._left)
            self._left -= granted
            return granted

    def give_back(self, count: int) -> None:
        with self._lock:
            self._left += count


def public_pem(key: ed25519.Ed25519PrivateKey | None = None) -> str:
    """The pubKey PEM of ``key`` (default: a fresh key nobody will sign with)."""
    key = key or ed25519.Ed25519PrivateKey.generate()
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def sign(key: ed25519.Ed25519PrivateKey, purpose: str, challenge: str, subject: str) -> str:
    """Base64 signature over a broker challenge (see ``broker_api.challenges``)."""
    data = f"compute-broker/v1\n{purpose}\n{challenge}\n{subject}".encode()
    return base64.b64encode(key.sign(data)).decode()


def user_body(
    challenge: str, email: str, password: str, address: str, key: ed25519.Ed25519PrivateKey | None = None
) -> dict[str, str]:
    """A ``POST /v1/users`` body whose pubKey is proven by signing ``challenge``."""
    key = key or ed25519.Ed25519PrivateKey.generate()
    return {
        "email": email,
        "password": password,
        "pubKey": public_pem(key),
        "address": address,
        "challenge": challenge,
        "signature": sign(key, "register", challenge, email.strip().lower()),
    }


def answer_probes(key: ed25519.Ed25519PrivateKey) -> int:
    """A stand-in host on a free loopback port that answers the broker's address probes
    with ``key``, so that an account of a load or benchmark run is proven, and matched,
    like a real peer; returns the port. The listener lives as long as the process."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            conn, _ = listener.accept()
            with conn:
                try:
                    conn.settimeout(5)
                    kind, payload = wire.read_frame(conn, max_frame=wire.JSON_LIMIT)
                    if kind is wire.Kind.PROBE:
                        probe.answer(conn, payload, key.sign)
                except (OSError, PeerError):
                    pass

    threading.Thread(target=serve, daemon=True, name="probe-answers").start()
    return int(listener.getsockname()[1])


class Client:
    """One simulated user: a peer that also requests pools, on one keep-alive session.
    Its address answers the broker's probes, so it is proven and matched."""

    def __init__(self, index: int, base: str, run_id: str, recorder: Recorder, seed: int) -> None:
        self.index = index
        self.key = ed25519.Ed25519PrivateKey.generate()
        self.address = f"127.0.0.1:{answer_probes(self.key)}"
        self.base = base
        self.email = f"load-{run_id}-{index}@example.org"
        self.recorder = recorder
        self.rng = random.Random(seed * 1000 + index)
        self.http = requests.Session()
        self.token = ""
        self.user_id = ""
        self.runtime = local_runtime()
        self.cycles = 0

    def call(
        self, method: str, endpoint: str, path: str, expected: int, **kwargs: Any
    ) -> requests.Response | None:
        """Send one request, record status and latency, and return the response if it
        had the expected status (None otherwise: the caller skips what depends on it)."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        started = time.perf_counter()
        try:
            response = self.http.request(method, self.base + path, headers=headers, timeout=30, **kwargs)
        except requests.RequestException as exc:
            elapsed = time.perf_counter() - started
            self.recorder.add(Sample(endpoint, 0, elapsed, False), f"{method} {path}: {exc!r}")
            return None
        elapsed = time.perf_counter() - started
        ok = response.status_code == expected
        detail = "" if ok else f"{method} {path} -> {response.status_code} {response.text[:200]}"
        self.recorder.add(Sample(endpoint, response.status_code, elapsed, ok), detail)
        return response if ok else None

    def setup(self) -> bool:
        """Create the account and log in (the log-in's token is the one used)."""
        got = self.call("POST", "POST /v1/challenges", "/v1/challenges", 201)
        if got is None:
            return False
        body = user_body(got.json()["challenge"], self.email, PASSWORD, self.address, self.key)
        created = self.call("POST", "POST /v1/users", "/v1/users", 201, json=body)
        if created is None:
            return False
        self.user_id = created.json()["id"]
        login = self.call(
            "POST", "POST /v1/tokens", "/v1/tokens", 201, json={"email": self.email, "password": PASSWORD}
        )
        if login is None:
            return False
        self.token = login.json()["token"]
        return True

    def offer(self, jobs: int) -> None:
        body = {"jobs": jobs, "runtime": self.runtime}
        self.call("POST", "POST /v1/users/me/jobs", "/v1/users/me/jobs", 200, json=body)

    def heartbeat(self) -> None:
        self.call("POST", "POST /v1/users/me/heartbeat", "/v1/users/me/heartbeat", 204)

    def request_pool(self) -> str | None:
        body: dict[str, Any] = {"workers": self.rng.randint(1, 2), "timeout": self.rng.randint(1, 3)}
        if self.rng.random() < 0.5:
            body["runtime"] = self.runtime  # else the matchmaker looks in every bucket
        created = self.call("POST", "POST /v1/sessions", "/v1/sessions", 202, json=body)
        return created.json()["id"] if created is not None else None

    def cycle(self, budget: Budget) -> bool:
        """One cycle within the budget; False when the budget is spent."""
        jobs = 2 if self.cycles % 2 == 0 else 0
        long_poll = self.rng.random() < 0.3
        listing = self.rng.random() < 0.3
        plan: list[str] = ["offer", "heartbeat", "pool", "read", *(["list"] if listing else []), "end"]
        granted = budget.take(len(plan))
        if granted < len(plan):
            plan = plan[:granted]
            if "pool" in plan:  # never create a pool this cycle cannot end
                plan = plan[: plan.index("pool")]
            budget.give_back(granted - len(plan))
        if not plan:
            return False
        self.cycles += 1
        session_id: str | None = None
        for step in plan:
            if step == "offer":
                self.offer(jobs)
            elif step == "heartbeat":
                self.heartbeat()
            elif step == "pool":
                session_id = self.request_pool()
            elif step == "read":
                self._read(session_id, long_poll)
            elif step == "list":
                self.call("GET", "GET /v1/sessions", "/v1/sessions", 200)
            elif step == "end":
                self._end(session_id)
        return True

    def _read(self, session_id: str | None, long_poll: bool) -> None:
        if session_id is None:
            return
        path = f"/v1/sessions/{session_id}"
        if long_poll:
            self.call("GET", "GET /v1/sessions/{id}?wait=1", path, 200, params={"wait": 1})
        else:
            self.call("GET", "GET /v1/sessions/{id}", path, 200)

    def _end(self, session_id: str | None) -> None:
        if session_id is not None:
            self.call("DELETE", "DELETE /v1/sessions/{id}", f"/v1/sessions/{session_id}", 204)

    def finish(self) -> None:
        """Offer 2 jobs and leave one pool open, so the audit sees held slots."""
        self.offer(2)
        self.heartbeat()
        self.request_pool()

    def close(self) -> None:
        self.http.close()


# -- report ---------------------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def latency_table(samples: Iterable[Sample]) -> list[str]:
    by_endpoint: dict[str, list[float]] = defaultdict(list)
    errors: dict[str, int] = defaultdict(int)
    for s in samples:
        by_endpoint[s.endpoint].append(s.seconds * 1000)
        errors[s.endpoint] += not s.ok
    rows = [f"{'endpoint':<34} {'count':>6} {'errors':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}"]

    def row(name: str, values: list[float], errs: int) -> str:
        values = sorted(values)
        return (
            f"{name:<34} {len(values):>6} {errs:>6} {percentile(values, 50):>8.1f} "
            f"{percentile(values, 99):>8.1f} {values[-1]:>8.1f}"
        )

    for name in sorted(by_endpoint):
        rows.append(row(name, by_endpoint[name], errors[name]))
    everything = list(itertools.chain.from_iterable(by_endpoint.values()))
    rows.append(row("all", everything, sum(errors.values())))
    short = [v for name, vals in by_endpoint.items() if "wait=" not in name for v in vals]
    rows.append(row("all but long-polls", short, sum(e for n, e in errors.items() if "wait=" not in n)))
    return rows


# -- audit ----------------------------------------------------------------------------


def wait_until_settled(settings: Settings, conn: redis.Redis, timeout: float = SETTLE_TIMEOUT) -> list[str]:
    """Wait until no session is pending and the matchmaker has no job queued, running or
    scheduled, twice in a row; returns a problem if that does not happen in time."""
    queue, probes = match_queue(conn), probe_queue(conn)
    deadline = time.monotonic() + timeout
    quiet = 0
    state: dict[str, int] = {}
    while time.monotonic() < deadline:
        with db.connection_context():
            pending = Session.select().where(Session.status == keys.Status.PENDING.value).count()
        state = {
            "pending sessions": pending,
            "queued jobs": queue.count,
            "running jobs": queue.started_job_registry.count,
            "scheduled jobs": queue.scheduled_job_registry.count,
            "queued or running probes": probes.count + probes.started_job_registry.count,
        }
        quiet = quiet + 1 if not any(state.values()) else 0
        if quiet >= 2:
            return []
        time.sleep(0.25)
    return [f"the matchmaker did not settle within {timeout:.0f} s: {state}"]


def audit(
    settings: Settings, conn: redis.Redis, clients: list[Client], logs: list[Path], summary: dict[str, Any]
) -> list[str]:
    """Every inconsistency between the accounts created, the database and Redis; what
    was compared goes into ``summary`` (so an "OK" can be seen not to be vacuous)."""
    problems: list[str] = []
    registry = Registry(conn, stale_after=settings.stale_after)
    with db.connection_context():
        users = {u.id: u for u in User.select()}
        sessions = {s.id: s for s in Session.select()}
        members = list(Member.select())

    for client in clients:
        user = users.get(client.user_id)
        if not client.user_id or user is None or user.email != client.email:
            problems.append(f"account {client.email} ({client.user_id or 'never created'}) is missing")

    holding: dict[str, dict[str, int]] = defaultdict(dict)  # session -> user -> slots
    held_by: dict[str, int] = defaultdict(int)
    for m in members:
        session = sessions.get(m.session_id)
        if session is None:
            problems.append(f"orphan member: user {m.user_id} in deleted session {m.session_id}")
            continue
        if m.user_id not in users:
            problems.append(f"orphan member: deleted user {m.user_id} in session {m.session_id}")
        if session.status not in keys.HOLDING:
            problems.append(f"member {m.user_id} of session {m.session_id}, which is {session.status}")
            continue
        holding[m.session_id][m.user_id] = m.slots
        held_by[m.user_id] += m.slots

    proven = 0
    for user_id, user in users.items():
        info = registry.peer(user_id)
        if info is None:
            if user.jobs or held_by[user_id]:
                problems.append(f"peer {user_id} offers {user.jobs} jobs but is not in the registry")
            continue
        where = f"peer {user_id} (jobs {user.jobs}, total {info.total}, held {info.held})"
        if info.held != held_by[user_id]:
            problems.append(f"{where}: held != {held_by[user_id]} slots of its memberships")
        if info.held < 0 or info.total - info.held < 0:
            problems.append(f"{where}: negative held or free slots")
        if info.held > user.jobs:
            problems.append(f"{where}: holds more slots than it offers")
        if info.total != user.jobs:
            problems.append(f"{where}: registry total differs from the account's jobs")
        if info.proven:
            proven += 1
        elif user.jobs:
            problems.append(f"{where}: address not proven ({info.proof.state}: {info.proof.detail})")
        bucket = conn.hget(keys.peer(user_id), "bucket")
        if bucket is not None:
            score = conn.zscore(keys.free(bucket.decode()), user_id)
            free = info.total - info.held if info.proven else 0  # only proven peers are matchable
            if (score or 0) != (free if free > 0 else 0):
                problems.append(f"{where}: free index says {score}, expected {free if free > 0 else None}")

    for session_id, session in sessions.items():
        allocation = registry.allocation(session_id)
        expected = holding.get(session_id, {})
        if allocation != expected:
            problems.append(
                f"session {session_id} ({session.status}): reservation {allocation} != members {expected}"
            )
    for key in conn.scan_iter(keys.alloc("*")):
        session_id = key.decode().removeprefix(keys.alloc(""))
        if session_id not in sessions and conn.hlen(key):
            problems.append(
                f"reservation {registry.allocation(session_id)} left for deleted session {session_id}"
            )

    statuses = _count(s.status for s in sessions.values())
    summary["sessions left"] = ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())) or "none"
    summary["member rows"] = len(members)
    summary["slots held"] = sum(held_by.values())
    summary["peers checked"] = len(users)
    summary["addresses proven"] = proven
    failed = match_queue(conn).failed_job_registry.count + probe_queue(conn).failed_job_registry.count
    if failed:
        problems.append(f"{failed} matchmaker jobs failed")
    for log in logs:
        text = log.read_text(errors="replace")
        if "Traceback" in text:
            start = text.index("Traceback")
            problems.append(f"{log.name} logged a traceback:\n{text[start : start + 1500]}")
    return problems


# -- main -----------------------------------------------------------------------------


def run_clients(clients: list[Client], phase: Callable[[Client], None]) -> None:
    threads = [threading.Thread(target=phase, args=(c,), name=f"client-{c.index}") for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.load", description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=5000, help="total requests (default 5000)")
    parser.add_argument("--quick", action="store_true", help="8 clients, 600 requests (for CI)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.requests = 8, 600
    cycle_budget = args.requests - args.clients * (SETUP_REQUESTS + FINAL_REQUESTS)
    if cycle_budget <= 0:
        parser.error(f"--requests must exceed {args.clients * (SETUP_REQUESTS + FINAL_REQUESTS)}")

    run_id = uuid.uuid4().hex[:8]
    # Empty REDIS_URL/DATABASE_URL: always a private Redis and SQLite file in the data
    # dir, never whatever the calling shell points at.
    stack_env = {"SCRYPT_N": "1024", "REDIS_URL": "", "DATABASE_URL": ""}
    with LocalStack(env=stack_env) as stack:
        settings = Settings.from_env(stack.env)
        where = f"Redis {settings.redis_url}, {settings.database_url}"
        print(f"stack: {stack.url} (gunicorn + 1 matchmaker, {where})", flush=True)
        recorder = Recorder()
        budget = Budget(cycle_budget)
        clients = [Client(i, stack.url, run_id, recorder, args.seed) for i in range(args.clients)]

        def work(client: Client) -> None:
            if not client.setup():
                return  # counted as errors; the others spend the budget
            while client.cycle(budget):
                pass
            client.finish()

        started = time.perf_counter()
        run_clients(clients, work)
        elapsed = time.perf_counter() - started
        for client in clients:
            client.close()

        conn = redis.Redis.from_url(settings.redis_url)
        bind_database(settings.database_url)
        problems = wait_until_settled(settings, conn)
        logs = [p.log for p in stack.processes if p.name in ("web", "matchmaker")]
        summary: dict[str, Any] = {}
        problems += audit(settings, conn, clients, logs, summary)
        conn.close()

    samples = recorder.samples
    errors = sum(not s.ok for s in samples)
    statuses = ", ".join(f"{k}: {v}" for k, v in sorted(_count(s.status for s in samples).items()))
    print(f"clients: {args.clients}, requests: {len(samples)} in {elapsed:.2f} s")
    print(f"requests/s: {len(samples) / elapsed:.0f}")
    cycles = [c.cycles for c in clients]
    print(f"cycles: {sum(cycles)} (median {statistics.median(cycles):.0f} per client), statuses: {statuses}")
    print("\n".join(latency_table(samples)))
    print(f"errors: {errors}")
    for detail in recorder.errors:
        print(f"  {detail}")
    if problems:
        print(f"consistency: {len(problems)} problem(s)")
        for problem in problems:
            print(f"  {problem}")
    else:
        print(f"consistency: OK ({'; '.join(f'{k}: {v}' for k, v in summary.items())})")
    return 0 if errors == 0 and not problems and len(samples) == args.requests else 1


def _count(values: Iterable[Any]) -> dict[Any, int]:
    counts: dict[Any, int] = defaultdict(int)
    for v in values:
        counts[v] += 1
    return counts


if __name__ == "__main__":
    sys.exit(main())
