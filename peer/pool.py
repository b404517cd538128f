"""``Pool``: a `concurrent.futures.Executor` whose workers are other people's peers.

    with Pool(workers=4) as pool:
        squares = list(pool.map(square, range(10_000)))

The pool asks the broker for a session lazily, on the first task, after checking that
the function and its first arguments serialize, so a mistake fails in milliseconds
instead of after a match. It then opens one mutually authenticated TLS channel per
worker (`peer.channel`) and keeps several tasks in flight per slot.

- Functions travel once per connection (dill, by content id); arguments and results
  use the C pickler with protocol-5 out-of-band buffers (`peer.codec`).
- ``map`` sends chunks of items as single tasks (`peer.tasks.Chunk`).
- Results arrive as typed data (`peer.datacodec`), never unpickled, unless
  ``trust_results=True``: then a result that could not travel as data is unpickled.
- When a worker's connection drops, only its unfinished tasks run again on the
  others, at most ``max_tries`` times each; ``pool.rerun`` counts them.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, InvalidStateError, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peer import codec, datacodec, tracked, wire
from peer.api import BrokerClient
from peer.channel import connect, keepalive
from peer.config import Account, default_broker, default_home
from peer.errors import PeerError, ProtocolError, TaskError
from peer.identity import Identity, normalize_public_key
from peer.runtime import local_runtime
from peer.tasks import Chunk
from peer.wire import TASK_ID, Kind

__all__ = ["NoWorkersError", "Pool", "PoolError", "RemoteError", "WorkerLost", "as_completed"]

log = logging.getLogger("peer.pool")

#: A remote task raised: type name, message and traceback text of the remote error.
RemoteError = TaskError


class PoolError(PeerError):
    """The pool could not be set up or used."""


class NoWorkersError(PoolError):
    """The broker found too few workers, or every worker was lost."""


class WorkerLost(PoolError):
    """A task's worker disconnected more often than the pool retries."""


@dataclass
class _Task:
    id: int
    code_id: str
    code: bytes
    data: list[wire.Buffer]
    future: Future
    items: int = 1
    tries: int = 0
    sent_at: float = 0.0


@dataclass(eq=False)
class _Link:
    """One TLS channel to one worker."""

    worker_id: str
    address: str
    slots: int
    tls: ssl.SSLSocket
    window: int
    inflight: dict[int, _Task] = field(default_factory=dict)
    sent_codes: set[str] = field(default_factory=set)
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    alive: bool = True
    done: int = 0
    last_heard: float = field(default_factory=time.monotonic)
    updates: list[tuple[Kind, list[wire.Buffer]]] = field(default_factory=list)
    pinged: bool = False

    @property
    def room(self) -> int:
        return self.slots * self.window - len(self.inflight) if self.alive else 0


class Pool(Executor):
    """Run Python functions on peers found through the broker.

    Args:
        workers: Workers (slots) to ask the broker for.
        broker: The broker's URL (default ``$COMPUTE_BROKER_URL`` or the account's).
        token: A broker token; or give ``email`` and ``password``; or neither, to use
            the account in ``home`` made by ``python -m peer init``.
        min_workers: Accept a partial pool of at least this many at ``timeout``.
        timeout: Seconds the broker may take to find workers.
        trust_results: Unpickle (with dill) results that cannot travel as data, and
            rebuild library classes, not only your own (only for peers you trust).
        home: Directory with this requester's key pair (see `peer.config`).
        max_tries: Times a task may be sent before a lost worker fails it.
        window: Tasks kept in flight per slot.
        silence: Seconds a worker with tasks in flight may stay silent (not even
            answering pings) before it counts as lost: a peer whose network or
            process froze without closing the connection is not waited on forever.
        task_timeout: Seconds a task may wait for its result before its worker counts
            as lost and the task runs elsewhere (default: no limit; peers enforce their
            own). Guards against a peer that answers pings but withholds results.
    """

    def __init__(
        self,
        workers: int = 2,
        *,
        broker: str | None = None,
        token: str | None = None,
        email: str | None = None,
        password: str | None = None,
        min_workers: int | None = None,
        timeout: int = 60,
        trust_results: bool = False,
        home: Path | str | None = None,
        max_tries: int = 3,
        window: int = 8,
        silence: float = 15.0,
        task_timeout: float | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.home = Path(home) if home else default_home()
        self.identity = Identity.load(self.home)
        account = None
        if token is None and email is None:
            account = Account.load(self.home)
        self._client = BrokerClient(
            broker or (account.broker if account else default_broker()), identity=self.identity
        )
        # (email, password or None): None logs in by key (a signed challenge).
        self._credentials: tuple[str, str | None] | None = (email, password) if email else None
        self._client.token = token or (account.token if account else None)
        if account and not token:
            self._credentials = (account.email, None)
        self.workers, self.min_workers, self.timeout = workers, min_workers, timeout
        self.trust_results, self.max_tries, self.window = trust_results, max_tries, window
        self.silence = silence
        self.task_timeout = task_timeout
        self.session_id: str | None = None
        self.rerun = 0
        self._links: list[_Link] = []
        self._queue: deque[_Task] = deque()
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._codes: dict[tuple[int, bool], tuple[Callable[..., Any], str, bytes]] = {}
        self._outstanding: set[Future] = set()
        self._started = False
        self._closed = False
        self._publisher = tracked.Publisher()
        self._sessions: list[str] = []  # replacement sessions
        self._replacements_left = workers
        self._replacing = 0

    # -- public API -----------------------------------------------------------------
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Run ``fn(*args, **kwargs)`` on a worker; returns a Future of its result."""
        code_id, code = self._code(fn)
        data = codec.dumps_data((args, kwargs))
        return self._enqueue([(code_id, code, data, 1)])[0]

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = None,
        progress: bool = False,
    ) -> Iterator[Any]:
        """Like `Executor.map`: results in order; items travel in chunks.

        Args:
            chunksize: Items per task (default: about 4 tasks per requested worker).
            progress: Show a tqdm progress bar of items done.
        """
        items = list(zip(*iterables, strict=False))
        if not items:
            return iter(())
        code_id, code = self._code(fn, chunked=True)
        if chunksize is None:
            chunksize = max(1, math.ceil(len(items) / (self.workers * 4)))
        chunksize = min(chunksize, max(1, len(items)))
        batch = []
        for start in range(0, len(items), chunksize):
            chunk = items[start : start + chunksize]
            batch.append((code_id, code, codec.dumps_data(((chunk,), {})), len(chunk)))
        futures = self._enqueue(batch)
        bar = _progress(len(items)) if progress else None
        if bar is not None:
            lock = threading.Lock()

            def advance(fut: Future, n: int) -> None:
                with lock:
                    bar.update(n)

            for fut, (_, _, _, n) in zip(futures, batch, strict=True):
                fut.add_done_callback(lambda f, n=n: advance(f, n))
        deadline = None if timeout is None else time.monotonic() + timeout

        def results() -> Iterator[Any]:
            try:
                for fut in futures:
                    left = None if deadline is None else max(0.0, deadline - time.monotonic())
                    yield from fut.result(left)
            finally:
                for fut in futures:
                    fut.cancel()
                if bar is not None:
                    bar.close()

        return results()

    def share(self, obj: Any) -> tracked.Handle:
        """Send a tracked object (its class built with `peer.tracked.Tracked`) to every
        worker once; later changes to it travel as ordered deltas ahead of the next
        tasks. Pass the returned handle to tasks: there it is the worker's replica."""
        self._ensure_started()
        with self._lock:
            handle = self._publisher.share(obj)
            self._sync_locked()
            links = [link for link in self._links if link.alive]
        for link in links:
            self._send(link, [])  # the snapshot goes out now, not with the next task
        return handle

    def _sync_locked(self) -> None:
        """Queue every tracked-object change not yet sent on every link (holding
        ``self._lock``; no socket I/O here, so a peer that stops reading cannot block
        the pool). `_send` writes a link's queued changes before any task it sends, so
        no task submitted after a change can overtake it."""
        updates = self._publisher.updates()
        if not updates:
            return
        frames = [tracked.update_frame(u) for u in updates]
        for link in self._links:
            if link.alive:
                link.updates.extend(frames)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Finish (or cancel) outstanding tasks, close the channels, end the session."""
        with self._lock:
            if self._closed:
                return
            if cancel_futures:
                while self._queue:
                    task = self._queue.popleft()
                    if not task.future.cancel():  # a re-run task is already running
                        _fail(task.future, PoolError("cancelled by shutdown(cancel_futures=True)"))
        if wait:
            for fut in list(self._outstanding):
                try:
                    fut.exception()
                except BaseException:  # noqa: S110 - cancelled; the caller holds the future
                    pass
        with self._lock:
            self._closed = True
            links, self._links = self._links, []
            # Nothing may stay pending forever once the pool is closed.
            stranded = [t.future for t in self._queue] + [
                t.future for lk in links for t in lk.inflight.values()
            ]
            self._queue.clear()
        for fut in stranded:
            if fut.done():
                continue
            if fut.running() or fut.set_running_or_notify_cancel():
                _fail(fut, PoolError("the pool was shut down before this task finished"))
        for link in links:
            link.alive = False
            wire.close_with_bye(link.tls, link.send_lock)
        for session_id in [self.session_id, *self._sessions]:
            if session_id:
                try:
                    self._client.end_session(session_id)
                except PeerError as exc:
                    log.warning("could not end session %s: %s", session_id, exc)
        self._client.close()

    @property
    def slots(self) -> int:
        """Slots of the workers currently connected."""
        with self._lock:
            return sum(link.slots for link in self._links if link.alive)

    @property
    def shares(self) -> dict[str, int]:
        """Items (one per ``submit``, one per mapped element) each worker, by address,
        has completed."""
        with self._lock:
            return {link.address: link.done for link in self._links}

    # -- setup ----------------------------------------------------------------------
    def _code(self, fn: Callable[..., Any], *, chunked: bool = False) -> tuple[str, bytes]:
        """Serialize a function once (dill is slow) and check it loads back here."""
        key = (id(fn), chunked)
        cached = self._codes.get(key)
        if cached is None or cached[0] is not fn:
            if not callable(fn):
                raise TypeError(f"expected a callable, got {type(fn).__name__}")
            try:
                code = codec.dumps_code(Chunk(fn) if chunked else fn)
                codec.loads_code(code)
            except Exception as exc:
                raise PoolError(f"cannot serialize {fn!r} with dill: {exc}") from exc
            cached = (fn, codec.code_id(code), code)
            if len(self._codes) > 1024:
                self._codes.clear()
            self._codes[key] = cached
        return cached[1], cached[2]

    def _ensure_started(self) -> None:
        with self._lock:
            if self._closed:
                raise PoolError("the pool has been shut down")
            if self._started:
                return
            self._start()
            self._started = True

    def _start(self) -> None:
        if self._client.token is None:
            if not self._credentials:
                raise PoolError("give token=, or email= and password=, or run `python -m peer init`")
            self._client.login(*self._credentials)
        try:
            me = self._client.me()
        except PeerError as exc:
            if self._credentials and getattr(exc, "status", None) == 401:
                self._client.login(*self._credentials)
                me = self._client.me()
            else:
                raise
        if normalize_public_key(me["pubKey"]) != self.identity.public_key:
            raise PoolError(
                f"the account's registered pubKey is not the key in {self.home}; "
                "run `python -m peer init` with this account on this machine"
            )
        created = self._client.request_pool(
            self.workers, min_workers=self.min_workers, timeout=self.timeout, runtime=local_runtime()
        )
        self.session_id = created["id"]
        session = created
        deadline = time.monotonic() + self.timeout + 30
        while session["status"] == "pending" and time.monotonic() < deadline:
            session = self._client.session(
                self.session_id, wait=min(25.0, max(1.0, deadline - time.monotonic()))
            )
        if session["status"] not in ("matched", "partial"):
            self._end_quietly()
            raise NoWorkersError(
                f"the broker found fewer than {self.min_workers or self.workers} worker(s) "
                f"in {self.timeout} s (session {session['status']})"
            )
        self._connect(session["workers"])

    def _open_links(self, session_id: str, workers: list[dict[str, Any]]) -> tuple[list[_Link], list[str]]:
        """Open channels to a session's workers in parallel; returns links and errors."""
        errors: list[str] = []
        opened: list[_Link] = []  # list.append is atomic

        def open_link(worker: dict[str, Any]) -> None:
            try:
                tls = connect(worker["address"], self.identity, session_id, worker["pubKey"])
            except (PeerError, OSError, ssl.SSLError) as exc:
                errors.append(f"{worker['address']}: {exc}")
                return
            keepalive(tls)
            opened.append(_Link(worker["id"], worker["address"], worker["slots"], tls, self.window))

        threads = [threading.Thread(target=open_link, args=(w,), daemon=True) for w in workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for error in errors:
            log.warning("worker unavailable: %s", error)
        return opened, errors

    def _connect(self, workers: list[dict[str, Any]]) -> None:
        opened, errors = self._open_links(self.session_id or "", workers)
        if not opened:
            self._end_quietly()
            raise NoWorkersError("could not connect to any worker: " + "; ".join(errors))
        self._adopt(opened)
        threading.Thread(target=self._watch, daemon=True, name="pool-watchdog").start()
        missing = sum(w["slots"] for w in workers) - sum(link.slots for link in opened)
        if missing > 0:
            self._replace_later(missing)

    def _adopt(self, links: list[_Link]) -> None:
        """Start using new links; a late joiner first gets every shared object."""
        with self._lock:
            self._sync_locked()  # what is pending goes to the old links; the backlog has it
            backlog = [tracked.update_frame(u) for u in self._publisher.backlog()]
            for link in links:
                link.updates.extend(backlog)
                self._links.append(link)
                threading.Thread(
                    target=self._reader, args=(link,), daemon=True, name=f"pool-{link.address}"
                ).start()

    def _replace_later(self, slots: int) -> None:
        """Ask the broker, in the background, for workers to replace lost ones."""
        with self._lock:
            slots = min(slots, self._replacements_left)
            if slots <= 0 or self._closed:
                return
            self._replacements_left -= slots
            self._replacing += 1
        threading.Thread(target=self._replace, args=(slots,), daemon=True, name="pool-replace").start()

    def _replace(self, slots: int) -> None:
        try:
            created = self._client.request_pool(slots, min_workers=1, timeout=10, runtime=local_runtime())
            with self._lock:
                self._sessions.append(created["id"])
            session = created
            deadline = time.monotonic() + 20
            while session["status"] == "pending" and time.monotonic() < deadline and not self._closed:
                session = self._client.session(created["id"], wait=5)
            if session["status"] not in ("matched", "partial") or self._closed:
                return
            opened, _ = self._open_links(created["id"], session["workers"])
            self._adopt(opened)
            if opened:
                log.info("pool: %d replacement worker(s) joined", len(opened))
            self._pump()
        except PeerError as exc:
            log.warning("could not get replacement workers: %s", exc)
        finally:
            with self._lock:
                self._replacing -= 1
                if not self._replacing and not any(lk.alive for lk in self._links):
                    self._fail_queue(NoWorkersError("every worker of the pool was lost and none replaced it"))

    def _end_quietly(self) -> None:
        for session_id in [self.session_id, *self._sessions]:
            if session_id:
                try:
                    self._client.end_session(session_id)
                except PeerError:
                    pass

    # -- dispatch -------------------------------------------------------------------
    def _enqueue(self, batch: list[tuple[str, bytes, list[wire.Buffer], int]]) -> list[Future]:
        self._ensure_started()
        futures = []
        with self._lock:
            self._sync_locked()
            for code_id, code, data, items in batch:
                fut: Future = Future()
                self._queue.append(_Task(next(self._ids), code_id, code, data, fut, items))
                self._outstanding.add(fut)
                fut.add_done_callback(self._outstanding.discard)
                futures.append(fut)
            if not any(link.alive for link in self._links) and not self._replacing:
                self._fail_queue(NoWorkersError("every worker of the pool was lost"))
        self._pump()
        return futures

    def _pump(self) -> None:
        """Send queued tasks to the links with room, most room first."""
        while True:
            with self._lock:
                link = max(self._links, key=lambda lk: lk.room, default=None)
                if link is None or link.room <= 0 or not self._queue:
                    return
                sends = []
                while self._queue and link.room > 0:
                    task = self._queue.popleft()
                    if task.tries == 0 and not task.future.set_running_or_notify_cancel():
                        continue
                    link.inflight[task.id] = task
                    task.sent_at = time.monotonic()
                    sends.append(task)
            if sends:
                self._send(link, sends)

    def _send(self, link: _Link, tasks: list[_Task]) -> None:
        try:
            with link.send_lock:
                with self._lock:  # lock order: send_lock, then self._lock (never the reverse)
                    frames, link.updates = link.updates, []
                for task in tasks:
                    if task.code_id not in link.sent_codes:
                        frames.append((Kind.FUNC, wire.pack_buffers([task.code_id.encode(), task.code])))
                        link.sent_codes.add(task.code_id)
                    head = [TASK_ID.pack(task.id), task.code_id.encode()]
                    frames.append((Kind.TASK, wire.pack_buffers([*head, *task.data])))
                wire.write_frames(link.tls, frames)
        except (OSError, ssl.SSLError) as exc:
            self._lost(link, f"send failed: {exc}")

    def _reader(self, link: _Link) -> None:
        try:
            while True:
                kind, payload = wire.read_frame(link.tls)
                if kind is not Kind.PONG or link.pinged:
                    link.last_heard = time.monotonic()  # an unasked-for PONG proves nothing
                    link.pinged = False
                if kind is Kind.RESULT:
                    parts = wire.unpack_buffers(payload)
                    (task_id,) = TASK_ID.unpack(parts[0])
                    task = self._finish(link, task_id)
                    if task is not None:
                        try:
                            value = codec.loads_data(parts[1:], trusted=self.trust_results)
                        except Exception as exc:
                            task.future.set_exception(exc)
                        else:
                            task.future.set_result(value)
                elif kind is Kind.ERROR:
                    msg = wire.decode_json(payload, limit=_ERROR_LIMIT)
                    task = self._finish(link, int(msg.get("task", -1)))
                    if task is not None:
                        task.future.set_exception(datacodec.task_error(msg))
                elif kind is Kind.BYE:
                    raise ProtocolError("the worker is shutting down")
                elif kind is Kind.PONG:
                    continue
                else:
                    raise ProtocolError(f"unexpected {kind.name} frame from a worker")
                if not link.inflight or link.room * 2 >= link.slots * link.window:
                    # Refill in batches of half a window: one TLS write for several
                    # tasks instead of one per result.
                    self._pump()
        except Exception as exc:  # any malformed frame from a peer means the link is lost
            if link.alive:
                self._lost(link, str(exc) or type(exc).__name__)

    def _watch(self) -> None:
        """Ping workers that owe results and have been quiet; drop the silent ones."""
        tick = min(1.0, self.silence / 4)
        while not self._closed:
            time.sleep(tick)
            now = time.monotonic()
            for link in list(self._links):
                if not link.alive or not link.inflight:
                    link.last_heard = max(link.last_heard, now - tick)
                    continue
                quiet = now - link.last_heard
                oldest = min((t.sent_at for t in list(link.inflight.values())), default=now)
                if self.task_timeout is not None and now - oldest > self.task_timeout:
                    self._lost(link, f"a task got no result within task_timeout={self.task_timeout:g} s")
                elif quiet > self.silence:
                    self._lost(link, f"no answer, not even to pings, for {quiet:.0f} s")
                elif quiet > tick and link.send_lock.acquire(blocking=False):
                    # A sender blocked on a frozen peer holds the lock: skip the ping;
                    # the silence check above still fires and closes the socket.
                    try:
                        wire.write_frame(link.tls, Kind.PING, [b"?"])
                        link.pinged = True
                    except (OSError, ssl.SSLError) as exc:
                        link.send_lock.release()
                        self._lost(link, f"ping failed: {exc}")
                    else:
                        link.send_lock.release()

    def _finish(self, link: _Link, task_id: int) -> _Task | None:
        with self._lock:
            task = link.inflight.pop(task_id, None)
            if task is not None:
                link.done += task.items
            return task

    def _lost(self, link: _Link, reason: str) -> None:
        """A worker is gone: run its unfinished tasks again elsewhere, bounded."""
        with self._lock:
            if not link.alive:
                return
            link.alive = False
            unfinished = sorted(link.inflight.values(), key=lambda t: t.id, reverse=True)
            link.inflight.clear()
            closed = self._closed
        wire.close_quietly(link.tls)
        if closed:
            return
        log.warning("worker %s lost (%s); re-running %d task(s)", link.address, reason, len(unfinished))
        with self._lock:
            for task in unfinished:
                task.tries += 1
                if task.tries >= self.max_tries:
                    task.future.set_exception(
                        WorkerLost(
                            f"task lost its worker {task.tries} times (last: {link.address}, {reason})"
                        )
                    )
                else:
                    self.rerun += 1
                    self._queue.appendleft(task)
        self._replace_later(link.slots)
        with self._lock:
            if not any(lk.alive for lk in self._links) and not self._replacing:
                self._fail_queue(NoWorkersError(f"every worker of the pool was lost (last: {reason})"))
        self._pump()

    def _fail_queue(self, error: Exception) -> None:
        while self._queue:
            task = self._queue.popleft()
            if task.tries or task.future.set_running_or_notify_cancel():
                task.future.set_exception(error)

    def __repr__(self) -> str:
        return f"<Pool session={self.session_id} links={len(self._links)} slots={self.slots}>"


#: Remote errors carry up to 8 KiB of message and 32 KiB of traceback characters,
#: which JSON may escape to 6 bytes each.
_ERROR_LIMIT = 1024 * 1024


def _fail(fut: Future, error: Exception) -> None:
    """Set an exception unless the future is already done (a race we may lose)."""
    try:
        fut.set_exception(error)
    except InvalidStateError:
        pass


def _progress(total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="item", smoothing=0.1, disable=os.environ.get("TQDM_DISABLE") == "1")
