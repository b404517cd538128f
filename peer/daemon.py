"""The contributor's daemon: announce slots, heartbeat, accept work, run it sandboxed.

Threads, each with one job:
- the front door (`peer.door.FrontDoor`: one selector thread and a fixed number of
  handshake threads) accepts connections, reads each bounded JSON hello and runs the
  `peer.channel` handshake (authorizing the requester with the broker before anything
  but that hello is read); a stranger's connections never get a thread of their own;
- each admitted connection gets one thread (at most `MAX_CONNECTIONS_PER_SESSION` per
  session, and sessions are bounded by the slots the broker matched), which reads
  frames: FUNC (code, kept per connection), TASK (queued for a slot), PING;
- one thread per slot owns a `peer.sandbox.Slot` (a sandboxed child process) for its
  whole life and runs the tasks the `WorkQueue` gives it, writing each result back on
  the task's connection;
- the heartbeat thread tells the broker every few seconds that the peer is alive.

The daemon never unpickles: task data and results pass through as opaque buffers.
Every frame a requester sends is charged, from its header and before its body is read,
to its session's and the daemon's byte budget (`peer.budget`): one session cannot grow
the daemon past its share however many connections it opens.
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import socket
import ssl
import struct
import tempfile
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from peer import tasks as _tasks  # noqa: F401 - loaded before slots fork, so sandboxes can use it
from peer import tracked, wire
from peer.api import BrokerClient, BrokerError, BrokerUnreachable
from peer.budget import MIB, Budget, OverBudget
from peer.channel import Hello, Refused, answer, keepalive
from peer.confine import LAYERS
from peer.door import FrontDoor, Gate
from peer.errors import PeerError, ProtocolError, SandboxError, TaskError
from peer.identity import Identity, normalize_public_key
from peer.runtime import local_runtime
from peer.sandbox import DEFAULT_BASE_UID, Limits, Slot
from peer.wire import TASK_ID, Kind

log = logging.getLogger("peer")
T = TypeVar("T")

OPEN = ("matched", "partial")
#: Per connection: tasks waiting or running; functions kept. A requester's own pool
#: keeps slots x window tasks in flight, far below these; past them a connection is cut.
#: The bytes every frame holds are charged to its session's and the daemon's `Budget`.
MAX_HANDSHAKES = 64  # connections not yet authorized, at once
MAX_HANDSHAKES_PER_SOURCE = 8  # of which from one address
HANDSHAKE_DEADLINE = 15.0  # seconds for the whole handshake
HANDSHAKE_WORKERS = 4  # threads finishing handshakes whose hello has arrived
#: Connections the kernel completes before we accept them: a flood that outruns the
#: front door for a moment must not fill it, or the requester's SYN is dropped and it
#: waits a second for the retransmit.
LISTEN_BACKLOG = 1024
MAX_CONNECTIONS_PER_SESSION = 4  # a newer one replaces the oldest (a requester reconnecting)
MAX_QUEUED_TASKS = 4096
MAX_FUNCTIONS = 1024
MAX_FUNCTION_BYTES = 256 * 1024**2
AUTH_CACHE_SECONDS = 15.0


class DaemonError(PeerError):
    """The daemon cannot start (port in use, broker unreachable, ...)."""


UID_BLOCK = 64
UID_BLOCKS = 256


def claim_uid_block(jobs: int) -> tuple[int, list[int]]:
    """Claim a block of sandbox uids no other daemon on this host is using.

    A slot's uid is its sandbox's identity for RLIMIT_NPROC and for killing every
    process a task left behind, so two daemons on one host (tests, the demo, a
    contributor lending two accounts) must never share one: each holds an flock on
    its block's lock file for as long as it lives. Returns the base uid and the lock
    file descriptors to keep open.
    """
    if jobs > UID_BLOCK:
        raise DaemonError(f"at most {UID_BLOCK} slots per daemon")
    root = Path("/run/lock") if os.access("/run/lock", os.W_OK) else Path(tempfile.gettempdir())
    lock_dir = root / "compute-broker-uids"
    lock_dir.mkdir(mode=0o755, exist_ok=True)
    # Block 0 (DEFAULT_BASE_UID) is left to programs that drive `Slot` directly.
    for block in range(1, UID_BLOCKS):
        base = DEFAULT_BASE_UID + block * UID_BLOCK
        fd = os.open(lock_dir / f"{base}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return base, [fd]
    raise DaemonError(f"every sandbox uid block under {lock_dir} is in use")


@dataclass
class Grant:
    """What the broker says a session may use on this peer."""

    owner_key: str
    slots: int
    expires: float


class Authorizer:
    """Asks the broker whether a requester may use this peer, caching its answers briefly.

    A requester is accepted only for an open (``matched``/``partial``) session that
    lists this peer as a member and whose owner's registered pubKey is the key of the
    certificate it showed.

    Every hello costs a broker query unless cached, so a stranger could make the peer
    hammer the broker with made-up session ids. Hence: a refusal is remembered for
    ``NEGATIVE_SECONDS``, both caches are bounded, and each source address gets at most
    ``LOOKUPS_PER_SOURCE`` uncached lookups per ``LOOKUP_WINDOW`` seconds.
    """

    NEGATIVE_SECONDS = 5.0
    LOOKUPS_PER_SOURCE = 32
    LOOKUP_WINDOW = 5.0
    MAX_ENTRIES = 4096

    def __init__(self, client: BrokerClient, *, ttl: float = AUTH_CACHE_SECONDS) -> None:
        self._client = client
        self._ttl = ttl
        self._cache: OrderedDict[str, Grant] = OrderedDict()
        self._refused: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._lookups: OrderedDict[str, tuple[float, int]] = OrderedDict()
        self._lock = threading.Lock()

    def grant(self, session_id: str, *, fresh: bool = False, source: str | None = None) -> Grant | str:
        """The session's grant, or the reason there is none.

        ``source`` (the requester's address) is charged for a lookup the caches cannot
        answer; ``fresh`` skips the caches (the daemon re-checks a live session).
        """
        now = time.monotonic()
        with self._lock:
            if not fresh:
                cached = self._cache.get(session_id)
                if cached and cached.expires > now:
                    return cached
                refused = self._refused.get(session_id)
                if refused and refused[0] > now:
                    return refused[1]
            if source is not None and not self._charge(source, now):
                return "too many unknown sessions from this address; try again shortly"
        try:
            session = self._client.session(session_id)
        except BrokerError as exc:
            if exc.status == 404:
                return self._refuse(session_id, "no such session among those this peer works in")
            return f"the broker could not confirm the session ({exc.status})"
        except BrokerUnreachable:
            return "the broker cannot be reached to confirm the session"
        if session.get("status") not in OPEN or session.get("role") != "member" or not session["workers"]:
            return self._refuse(session_id, f"session is {session.get('status')}, not open for this peer")
        grant = Grant(
            normalize_public_key(session["owner"]["pubKey"]), session["workers"][0]["slots"], now + self._ttl
        )
        with self._lock:
            self._refused.pop(session_id, None)
            self._cache[session_id] = grant
            self._cache.move_to_end(session_id)
            _trim(self._cache, self.MAX_ENTRIES)
        return grant

    def __call__(self, hello: Hello, source: str | None = None) -> str | None:
        grant = self.grant(hello.session_id, source=source)
        if isinstance(grant, str):
            return grant
        if grant.owner_key != hello.public_key:
            return "the certificate's key is not the session owner's registered pubKey"
        return None

    def _refuse(self, session_id: str, reason: str) -> str:
        with self._lock:
            self._cache.pop(session_id, None)
            self._refused[session_id] = (time.monotonic() + self.NEGATIVE_SECONDS, reason)
            self._refused.move_to_end(session_id)
            _trim(self._refused, self.MAX_ENTRIES)
        return reason

    def _charge(self, source: str, now: float) -> bool:
        """Count one uncached lookup for ``source``; False once its window's budget is spent."""
        start, used = self._lookups.get(source, (now, 0))
        if now - start >= self.LOOKUP_WINDOW:
            start, used = now, 0
        if used >= self.LOOKUPS_PER_SOURCE:
            return False
        self._lookups[source] = (start, used + 1)
        self._lookups.move_to_end(source)
        _trim(self._lookups, self.MAX_ENTRIES)
        return True


def _trim(entries: OrderedDict[str, Any], limit: int) -> None:
    """Drop the oldest entries beyond ``limit``."""
    while len(entries) > limit:
        entries.popitem(last=False)


@dataclass(eq=False)
class Connection:
    """One authenticated requester connection."""

    tls: ssl.SSLSocket
    session_id: str
    address: str
    codes: dict[str, bytes] = field(default_factory=dict)
    shared: tracked.SharedLog = field(default_factory=tracked.SharedLog)
    write_lock: threading.Lock = field(default_factory=threading.Lock)
    alive: bool = True
    tasks: int = 0
    opened: float = field(default_factory=time.monotonic)
    queued: int = 0
    code_bytes: int = 0
    #: Bytes charged to the budget for this connection's code and shared objects.
    held: int = 0
    count_lock: threading.Lock = field(default_factory=threading.Lock)
    thread: threading.Thread | None = None

    def send(self, kind: Kind, parts: list[wire.Buffer]) -> None:
        if not self.alive:
            return
        try:
            with self.write_lock:
                wire.write_frame(self.tls, kind, parts)
        except OSError:
            self.alive = False


@dataclass
class Work:
    conn: Connection
    task_id: bytes
    code_id: str
    data: list[memoryview]
    upto: int = 0
    size: int = 0


class WorkQueue:
    """Tasks waiting for a slot, per session, each session limited to the slots it was
    granted: one requester cannot take the slots another session was matched with."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queues: dict[str, deque[Work]] = {}
        self._running: dict[str, int] = {}
        self._limits: dict[str, int] = {}
        self._order: deque[str] = deque()
        self._closed = False
        self.busy = 0

    def put(self, work: Work, limit: int) -> None:
        with self._cond:
            sid = work.conn.session_id
            self._limits[sid] = limit
            if sid not in self._queues:
                self._queues[sid] = deque()
                self._order.append(sid)
            self._queues[sid].append(work)
            self._cond.notify()

    def take(self, idle: Callable[[], None] | None = None) -> Work | None:
        """The next runnable task (round-robin over sessions), or None once closed.

        ``idle`` is called (without the lock) once each time the caller would have to
        wait, so a slot can prepare a fresh sandbox while nothing is queued instead
        of in front of the next task.
        """
        prepared = False
        with self._cond:
            while True:
                for _ in range(len(self._order)):
                    sid = self._order[0]
                    self._order.rotate(-1)
                    queue = self._queues[sid]
                    if queue and self._running.get(sid, 0) < self._limits.get(sid, 1):
                        self._running[sid] = self._running.get(sid, 0) + 1
                        self.busy += 1
                        return queue.popleft()
                if self._closed:
                    return None
                if idle is not None and not prepared:
                    self._cond.release()
                    try:
                        idle()
                    finally:
                        self._cond.acquire()
                    prepared = True
                    continue  # look again: work may have come meanwhile
                self._cond.wait()
                prepared = False

    def done(self, work: Work) -> None:
        with self._cond:
            sid = work.conn.session_id
            self._running[sid] -= 1
            self.busy -= 1
            if not self._running[sid] and not self._queues[sid]:
                del self._running[sid], self._queues[sid], self._limits[sid]
                self._order.remove(sid)
            self._cond.notify_all()

    def drop(self, conn: Connection) -> list[Work]:
        """Forget a closed connection's queued tasks; returns them."""
        with self._cond:
            queue = self._queues.get(conn.session_id)
            if not queue:
                return []
            sid = conn.session_id
            kept = deque(w for w in queue if w.conn is not conn)
            dropped = [w for w in queue if w.conn is conn]
            self._queues[sid] = kept
            if not kept and not self._running.get(sid, 0):  # forget the session, as `done` would
                self._running.pop(sid, None)
                del self._queues[sid], self._limits[sid]
                self._order.remove(sid)
            return dropped

    def wake(self) -> None:
        """Let idle slots look around again (a connection closed: time to recycle)."""
        with self._cond:
            self._cond.notify_all()

    def pending(self) -> int:
        with self._cond:
            return sum(len(q) for q in self._queues.values()) + self.busy

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class PeerDaemon:
    """Serve ``jobs`` slots on ``host:port`` for sessions the broker matches us with.

    Args:
        identity: The peer's key pair; its pubKey must be the one registered.
        client: A logged-in broker client (the peer's account).
        advertise: ``host:port`` requesters should dial (default ``host:port``).
        limits: Sandbox limits of each slot.
        scratch: Directory for the slots' scratch directories.
        heartbeat: Seconds between heartbeats (keep under the broker's interval).
        lease: Seconds a session this peer works for may go without any connection
            from its requester before the peer leaves it, freeing its slots for
            others (a requester that vanished does not hold them forever; the session
            record itself stays until its owner deletes it).
        session_bytes, held_bytes: Bytes of requesters' frames held at once for one
            session and for all of them (`peer.budget`).
    """

    def __init__(
        self,
        identity: Identity,
        client: BrokerClient,
        *,
        jobs: int,
        host: str = "0.0.0.0",  # noqa: S104 - peers serve the internet by design
        port: int = 0,
        advertise: str | None = None,
        limits: Limits | None = None,
        scratch: Path,
        heartbeat: float = 5.0,
        lease: float = 60.0,
        relogin: Callable[[], None] | None = None,
        session_bytes: int = 1024 * MIB,
        held_bytes: int = 2048 * MIB,
    ) -> None:
        self.identity = identity
        self.client = client
        self.jobs = jobs
        self.limits = limits or Limits()
        self.scratch = Path(scratch)
        self.heartbeat_interval = heartbeat
        self.lease = lease
        self._idle_since: dict[str, float] = {}
        self._relogin = relogin
        self.authorizer = Authorizer(client)
        self.queue = WorkQueue()
        self.budget = Budget(session_bytes, held_bytes)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: set[Connection] = set()
        self._conns_lock = threading.Lock()
        self._handshakes = Gate(MAX_HANDSHAKES, MAX_HANDSHAKES_PER_SOURCE)
        #: Authenticated connections at once: as many per session as the sessions the
        #: broker can match with our slots could use, with room for a few that linger.
        self._max_connections = MAX_CONNECTIONS_PER_SESSION * max(jobs, 1) * 2
        self._slots_ready = threading.Barrier(jobs + 1)
        self.base_uid, self._uid_locks = (
            claim_uid_block(jobs) if os.geteuid() == 0 else (DEFAULT_BASE_UID, [])
        )
        self.listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.listener.bind((host, port))
        except OSError as exc:
            self.listener.close()
            raise DaemonError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        self.listener.listen(LISTEN_BACKLOG)
        self._door = FrontDoor(
            self.listener,
            self._handshakes,
            handshake=self._handshake,
            admit=self._admit,
            workers=HANDSHAKE_WORKERS,
            deadline=HANDSHAKE_DEADLINE,
            accepted=_tune,
        )
        self.port = self.listener.getsockname()[1]
        self.address = advertise or f"{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{self.port}"  # noqa: S104
        self.completed = 0
        #: Confinement layers the kernel refused (`peer.confine.LAYERS`), with why.
        self.missing_layers: dict[str, str] = {}

    # -- life cycle ---------------------------------------------------------------
    def start(self) -> None:
        """Start the slots, register with the broker, then accept requesters."""
        for index in range(self.jobs):
            self._spawn(self._slot_loop, index, name=f"slot-{index}")
        try:
            self._slots_ready.wait(60)
        except threading.BrokenBarrierError:
            self.stop(drain=0)
            raise DaemonError("a sandbox slot could not start; see the log above") from None
        if self.missing_layers:
            missing = "; ".join(f"{name}: {why}" for name, why in self.missing_layers.items())
            log.warning("sandbox layers that do not hold here: %s", missing)
        else:
            log.info("sandbox: every layer holds (%s)", ", ".join(LAYERS))
        self._broker(lambda: self.client.update_me(address=self.address, pubKey=self.identity.public_key))
        self._broker(lambda: self.client.set_jobs(self.jobs, local_runtime()))
        self._spawn(self._heartbeat_loop, name="heartbeat")
        self._door.start()
        log.info("serving %d slot(s) at %s", self.jobs, self.address)

    def stop(self, *, drain: float = 30.0) -> None:
        """Stop taking work, withdraw from the broker, finish running tasks (up to
        ``drain`` seconds), then close every connection and slot."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._door.stop()
        self.listener.close()
        try:
            self._broker(lambda: self.client.set_jobs(0))
        except PeerError as exc:
            log.warning("could not set jobs to 0: %s", exc)
        deadline = time.monotonic() + drain
        while self.queue.pending() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.queue.close()
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            wire.close_with_bye(conn.tls, conn.write_lock)
            conn.alive = False
        for thread in [*self._threads, *(c.thread for c in conns if c.thread is not None)]:
            thread.join(10)
        for fd in self._uid_locks:
            os.close(fd)
        log.info("stopped after %d task(s)", self.completed)

    def _spawn(self, target: Callable[..., None], *args: object, name: str) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _broker(self, call: Callable[[], T]) -> T:
        try:
            return call()
        except BrokerError as exc:
            if exc.status != 401 or self._relogin is None:
                raise
            self._relogin()
            return call()

    # -- threads ------------------------------------------------------------------
    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_interval):
            try:
                self._broker(self.client.heartbeat)
                self._expire_leases()
            except PeerError as exc:
                log.warning("heartbeat failed: %s", exc)

    def _expire_leases(self) -> None:
        """Leave open sessions whose requester has had no connection for ``lease`` s, and
        drop connections of sessions that are no longer open."""
        asked = time.monotonic()
        sessions = self._broker(lambda: self.client.sessions(status=",".join(OPEN)))
        now = time.monotonic()
        with self._conns_lock:
            connected = {c.session_id for c in self._conns if c.alive}
        mine = {s["id"] for s in sessions if s["role"] == "member" and s["status"] in OPEN}
        # A session ended (or left) at the broker stops here too: its connections close.
        with self._conns_lock:
            ended = [c for c in self._conns if c.alive and c.session_id not in mine and c.opened < asked]
        for conn in ended:
            log.info("session %s: no longer open at the broker; closing its connection", conn.session_id[:8])
            conn.alive = False
            wire.close_quietly(conn.tls)
        for sid in list(self._idle_since):
            if sid not in mine or sid in connected:
                del self._idle_since[sid]
        for sid in mine - connected:
            since = self._idle_since.setdefault(sid, now)
            if now - since >= self.lease:
                try:
                    self._broker(lambda sid=sid: self.client.leave_session(sid))
                    log.info("session %s: no requester for %.0f s; left it (lease)", sid[:8], now - since)
                except BrokerError as exc:
                    if exc.status != 404:
                        raise
                self._idle_since.pop(sid, None)

    def _handshake(
        self, sock: socket.socket, address: str, kind: Kind, hello: memoryview, timeout: float
    ) -> tuple[ssl.SSLSocket, Hello] | None:
        """Answer a hello the front door read (a handshake thread): the TLS socket and
        the checked hello, or None once refused or failed (``sock`` is then closed)."""
        source = address.rsplit(":", 1)[0]
        try:
            return answer(
                sock, kind, hello, self.identity, lambda h: self._authorize(h, source), timeout=timeout
            )
        except Refused as exc:
            log.info("refused %s: %s", address, exc)
        except (ProtocolError, OSError, ssl.SSLError, ValueError) as exc:
            log.info("handshake with %s failed: %s", address, exc)
        wire.close_quietly(sock)
        return None

    def _authorize(self, hello: Hello, source: str) -> str | None:
        with self._conns_lock:
            if len(self._conns) >= self._max_connections:
                return "this peer has too many connections open; try again shortly"
        return self.authorizer(hello, source)

    def _admit(self, tls: socket.socket, hello: Hello, address: str) -> None:
        """Start serving an authenticated connection on a thread of its own. A session
        keeps at most `MAX_CONNECTIONS_PER_SESSION`: a newer one closes its oldest."""
        assert isinstance(tls, ssl.SSLSocket)
        conn = Connection(tls, hello.session_id, address)
        conn.thread = threading.Thread(
            target=self._serve_connection, args=(conn,), name=f"conn-{address}", daemon=True
        )
        with self._conns_lock:
            same = sorted(
                (c for c in self._conns if c.session_id == hello.session_id), key=lambda c: c.opened
            )
            self._conns.add(conn)
        for old in same[: max(0, len(same) + 1 - MAX_CONNECTIONS_PER_SESSION)]:
            log.info("session %s: more than %d connections; closing the oldest", hello.session_id[:8],
                     MAX_CONNECTIONS_PER_SESSION)  # fmt: skip
            old.alive = False
            wire.close_quietly(old.tls)
        conn.thread.start()

    def _serve_connection(self, conn: Connection) -> None:
        hello_session, address, tls = conn.session_id, conn.address, conn.tls
        grant = self.authorizer.grant(hello_session)
        slots = grant.slots if not isinstance(grant, str) else 1
        log.info("session %s: requester connected from %s (%d slot(s))", hello_session[:8], address, slots)
        try:
            self._read_frames(conn, slots)
        except (ProtocolError, OSError, ssl.SSLError) as exc:
            if conn.alive and not self._stop.is_set():
                log.info("session %s: connection from %s ended: %s", hello_session[:8], address, exc)
        finally:
            conn.alive = False
            dropped = self.queue.drop(conn)
            for work in dropped:
                self._finished(work)
            self.budget.release(conn.session_id, conn.held, draining=False)
            conn.held = 0
            with self._conns_lock:
                self._conns.discard(conn)
            self.queue.wake()  # idle slots may now replace a child that served this session
            wire.close_quietly(tls)
            log.info(
                "session %s: %s disconnected after %d task(s)%s; %s",
                hello_session[:8],
                address,
                conn.tasks,
                f", {len(dropped)} queued task(s) dropped" if dropped else "",
                self.budget.describe(hello_session),
            )

    def _read_frames(self, conn: Connection, slots: int) -> None:
        # Runs until the requester or `stop` closes the connection: while draining,
        # results of tasks already received still go out on it.
        def cancelled() -> bool:
            return not conn.alive or self._stop.is_set() or _hung_up(conn.tls)

        while True:
            kind, length = wire.read_header(conn.tls)
            # Charged before the body is allocated: waits while the session's or the
            # daemon's budget is full (backpressure), refuses what could never fit.
            try:
                self.budget.reserve(conn.session_id, length, draining=kind is Kind.TASK, cancelled=cancelled)
            except OverBudget as exc:
                self._over_budget(conn, kind, length, exc)
                continue
            try:
                payload = wire.read_payload(conn.tls, kind, length)
                kept = self._frame(conn, kind, payload, length, slots)
            except BaseException:
                self.budget.release(conn.session_id, length, draining=kind is Kind.TASK)
                raise
            if kept < length:
                self.budget.release(conn.session_id, length - kept, draining=kind is Kind.TASK)
            if kind is Kind.BYE:
                return

    def _frame(self, conn: Connection, kind: Kind, payload: memoryview, length: int, slots: int) -> int:
        """Act on one frame; returns how many of its ``length`` charged bytes it still
        holds (a queued task: all; a function: its code; a ping: none)."""
        if kind is Kind.TASK:
            parts = wire.unpack_buffers(payload)
            if len(parts) < 2 or len(parts[0]) != TASK_ID.size:
                raise ProtocolError("TASK needs a task id and a code id")
            code_id = bytes(parts[1]).decode("ascii", "replace")
            if code_id not in conn.codes:
                conn.send(
                    Kind.ERROR,
                    [_error(parts[0], TaskError("LookupError", "no function was sent with that id"))],
                )
                return 0
            if conn.queued >= MAX_QUEUED_TASKS:
                raise ProtocolError("too many tasks queued on one connection")
            work = Work(conn, bytes(parts[0]), code_id, parts[2:], conn.shared.revision, length)
            with conn.count_lock:
                conn.queued += 1
            self.queue.put(work, slots)
            return length  # released by `_finished` when the task has run or is dropped
        if kind in (Kind.SHARE, Kind.DELTA):
            # Opaque to the daemon: appended in arrival order, replayed into the
            # sandboxes before the tasks that follow it. The log may let older
            # buffers go: what the connection holds follows the log's own size.
            conn.shared.append(tracked.update_from_frame(kind, payload))
            before, now = conn.held - conn.code_bytes, conn.shared.nbytes
            conn.held = conn.code_bytes + now
            kept = now - before
            if kept > length:  # the log's per-update overhead: already in memory
                self.budget.force(conn.session_id, kept - length)
                return length
            if kept < 0:  # a snapshot replaced more than it brought
                self.budget.release(conn.session_id, -kept, draining=False)
                return 0
            return kept
        if kind is Kind.FUNC:
            parts = wire.unpack_buffers(payload)
            if len(parts) != 2:
                raise ProtocolError("FUNC needs a code id and the code")
            if len(conn.codes) >= MAX_FUNCTIONS or conn.code_bytes + len(parts[1]) > MAX_FUNCTION_BYTES:
                raise ProtocolError("too many functions sent on one connection")
            code_id = bytes(parts[0]).decode("ascii", "replace")
            old = len(conn.codes.get(code_id, b""))
            conn.codes[code_id] = bytes(parts[1])
            conn.code_bytes += len(parts[1]) - old
            conn.held += len(parts[1]) - old
            self.budget.release(conn.session_id, old, draining=False)
            return len(parts[1])
        if kind is Kind.PING:
            conn.send(Kind.PONG, [payload])
            return 0
        if kind is Kind.BYE:
            return 0
        raise ProtocolError(f"unexpected {kind.name} frame from a requester")

    def _over_budget(self, conn: Connection, kind: Kind, length: int, exc: OverBudget) -> None:
        """A frame that cannot be held: a task fails with a clear error (its body is read
        through a small buffer and dropped, so the connection goes on); anything else
        ends the connection, after an ERROR frame saying why."""
        log.info("session %s: %s frame of %d bytes refused: %s", conn.session_id[:8], kind.name, length, exc)
        if kind is Kind.TASK:
            task_id = _task_id_then_skip(conn.tls, length)
            conn.send(
                Kind.ERROR, [_error(task_id, TaskError("MemoryError", f"task refused by the peer: {exc}"))]
            )
            return
        conn.send(Kind.ERROR, [wire.encode_json({"type": "MemoryError", "message": str(exc), "task": -1})])
        raise ProtocolError(f"{kind.name} frame over budget: {exc}")

    def _finished(self, work: Work) -> None:
        """A task has run or was dropped: its bytes go back to the budget."""
        with work.conn.count_lock:
            work.conn.queued -= 1
        self.budget.release(work.conn.session_id, work.size, draining=True)
        work.data = []

    def _slot_loop(self, index: int) -> None:
        try:
            slot = Slot(
                self.limits, index, self.scratch, base_uid=self.base_uid, hide=[self.identity.key_path.parent]
            )
            self.missing_layers = slot.missing_layers()
        except (SandboxError, OSError) as exc:
            log.error("slot %d could not start: %s", index, exc)
            self._slots_ready.abort()
            return
        self._slots_ready.wait()
        last_session: str | None = None

        def prepare() -> None:
            """While idle, replace a child that served a session now disconnected."""
            nonlocal last_session
            if last_session is None:
                return
            with self._conns_lock:
                connected = any(c.alive and c.session_id == last_session for c in self._conns)
            if not connected:
                slot.recycle()
                last_session = None

        with slot:
            while (work := self.queue.take(idle=prepare)) is not None:
                try:
                    if not work.conn.alive:
                        continue
                    if work.conn.session_id != last_session:
                        if last_session is not None:
                            slot.recycle()  # nothing one session's tasks left may reach another's
                        last_session = work.conn.session_id
                    try:
                        out = slot.run(
                            work.code_id,
                            work.conn.codes[work.code_id],
                            work.data,
                            shared=work.conn.shared,
                            upto=work.upto,
                        )
                    except TaskError as exc:
                        work.conn.send(Kind.ERROR, [_error(work.task_id, exc)])
                    except SandboxError as exc:
                        work.conn.send(
                            Kind.ERROR, [_error(work.task_id, TaskError("SandboxError", str(exc)))]
                        )
                    except Exception as exc:  # a slot thread must never die
                        log.exception("slot %d: unexpected failure; replacing its sandbox", index)
                        work.conn.send(
                            Kind.ERROR,
                            [_error(work.task_id, TaskError("SandboxError", f"peer failure: {exc!r}"))],
                        )
                        slot.recycle()
                    else:
                        work.conn.send(Kind.RESULT, wire.pack_buffers([work.task_id, *out]))
                    work.conn.tasks += 1
                    self.completed += 1
                finally:
                    self.queue.done(work)
                    self._finished(work)


def _hung_up(sock: socket.socket) -> bool:
    """Whether the other side has closed or reset ``sock`` (checked without reading)."""
    poller = select.poll()
    poller.register(sock, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
    try:
        return bool(poller.poll(0))
    except OSError:
        return True


def _task_id_then_skip(sock: socket.socket, length: int) -> bytes:
    """Read a TASK payload's task id (its first buffer) and drop the rest unread into
    memory: the payload is `wire.pack_buffers` of the id, the code id and the data."""
    if length < 4:
        raise ProtocolError("TASK payload shorter than its buffer count")
    (count,) = struct.unpack("!I", wire.read_payload(sock, Kind.TASK, 4))
    head = 4 + 8 * count + TASK_ID.size
    if not 2 <= count <= wire.MAX_BUFFERS or head > length:
        raise ProtocolError("TASK payload does not start with a task id")
    lengths = struct.unpack(f"!{count}Q", wire.read_payload(sock, Kind.TASK, 8 * count))
    if lengths[0] != TASK_ID.size:
        raise ProtocolError("TASK payload does not start with a task id")
    task_id = bytes(wire.read_payload(sock, Kind.TASK, TASK_ID.size))
    wire.skip_payload(sock, Kind.TASK, length - head)
    return task_id


def _tune(sock: socket.socket) -> None:
    """Options of every accepted connection: small frames go out at once, and a vanished
    requester is noticed by keepalive (it must not hold its session's slots)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    keepalive(sock)


def _error(task_id: bytes | memoryview, error: TaskError) -> bytes:
    """An ERROR frame's JSON: the task's number and the error as text."""
    (number,) = TASK_ID.unpack(task_id)
    return wire.encode_json({**error.to_dict(), "task": number})
