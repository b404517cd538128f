"""How many bytes of requesters' frames the daemon holds: per session and in all.

A per-connection cap alone lets one session open more connections and hold more; so
every frame a requester sends is charged, from its header and before its body is read,
against its session's budget and the daemon's. What a frame holds is released when it
is no longer held: a task's data when the task has run (or been dropped), a function's
code or a shared object's buffers when their connection closes or the log lets them go.

Over budget, a reader waits (backpressure) instead of failing: it stops reading its
connection, TCP's flow control stops the requester's writes, and the connection goes
on as soon as running tasks release their bytes. An honest job that keeps more data in
flight than the budget (big arguments, a deep window) therefore runs at the speed its
slots allow instead of failing, and its data waits in the requester's memory, not ours.
Waiting is only allowed while it can end by itself: a frame larger than a whole budget,
or one that would not fit even once every queued task had run, is refused at once
(`OverBudget`), and the daemon answers it with a clear error. Waiters for the daemon's
budget are served in arrival order, so a session at its own cap never delays another
session whose bytes fit.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from peer.errors import PeerError

MIB = 1024 * 1024


class OverBudget(PeerError):
    """A frame cannot be held within its session's or the daemon's byte budget."""


@dataclass(eq=False)
class _Waiter:
    session: str
    size: int


class Budget:
    """Bytes held for requesters: at most ``per_session`` for one session, ``total`` in all.

    Charges are *draining* (task data: released when the task has run, without the
    requester doing anything) or not (code and shared objects, held until their
    connection closes); only draining bytes are worth waiting for. Thread-safe.
    """

    def __init__(self, per_session: int, total: int) -> None:
        if not 0 < per_session or not 0 < total:
            raise ValueError("byte budgets must be positive")
        self.per_session, self.total = per_session, total
        self._held: dict[str, int] = {}
        self._draining: dict[str, int] = {}
        self._all = 0
        self._all_draining = 0
        self._waiters: list[_Waiter] = []
        self._cond = threading.Condition(threading.Lock())  # not re-entered: a plain lock is cheaper

    def reserve(
        self,
        session: str,
        size: int,
        *,
        draining: bool,
        cancelled: Callable[[], bool] = lambda: False,
        tick: float = 0.25,
    ) -> None:
        """Charge ``size`` bytes to ``session``, waiting while they do not fit.

        ``cancelled`` is asked every ``tick`` seconds while waiting: True ends the wait
        with `ConnectionAbortedError` (the connection went away meanwhile).

        Raises:
            OverBudget: ``size`` can never fit, or not even once every task queued
                now has run; nothing is charged.
        """
        with self._cond:
            if not self._waiters and self._fits(session, size):  # the common case, kept cheap
                self._take(session, size, draining)
                return
            waiter = _Waiter(session, size)
            self._waiters.append(waiter)
            try:
                while True:
                    self._check_possible(session, size)
                    if self._fits(session, size) and self._first_fitting() is waiter:
                        self._take(session, size, draining)
                        return
                    self._cond.wait(tick)
                    if cancelled():
                        raise ConnectionAbortedError("the connection ended while waiting for memory")
            finally:
                self._waiters.remove(waiter)
                self._cond.notify_all()  # the next in line may fit now

    def release(self, session: str, size: int, *, draining: bool) -> None:
        """Give back ``size`` bytes charged to ``session`` by `reserve` (or `force`)."""
        if size <= 0:
            return
        with self._cond:
            left = self._held.get(session, 0) - size
            if left > 0:
                self._held[session] = left
            else:
                self._held.pop(session, None)
            self._all -= size
            if draining:
                self._all_draining -= size
                left = self._draining.get(session, 0) - size
                if left > 0:
                    self._draining[session] = left
                else:
                    self._draining.pop(session, None)
            if self._waiters:
                self._cond.notify_all()

    def force(self, session: str, size: int) -> None:
        """Charge a few bytes that are already held (bookkeeping overhead), without waiting."""
        if size > 0:
            with self._cond:
                self._take(session, size, False)

    def held(self, session: str | None = None) -> int:
        """Bytes charged to ``session``, or to every session."""
        with self._cond:
            return self._all if session is None else self._held.get(session, 0)

    def describe(self, session: str) -> str:
        """The session's and the daemon's use, for log lines."""
        with self._cond:
            mine = self._held.get(session, 0)
            return (
                f"{mine / MIB:.1f} of {self.per_session / MIB:.0f} MiB held for the session, "
                f"{self._all / MIB:.1f} of {self.total / MIB:.0f} MiB in all"
            )

    # -- under the lock -----------------------------------------------------------
    def _fits(self, session: str, size: int) -> bool:
        return self._held.get(session, 0) + size <= self.per_session and self._all + size <= self.total

    def _first_fitting(self) -> _Waiter | None:
        """The earliest waiter whose own session has room: next in line for the daemon's
        budget. A waiter held back by its own session's cap does not block others."""
        for waiter in self._waiters:
            if self._held.get(waiter.session, 0) + waiter.size <= self.per_session:
                return waiter
        return None

    def _check_possible(self, session: str, size: int) -> None:
        if size > self.per_session:
            raise OverBudget(
                f"a frame of {size / MIB:.1f} MiB exceeds the per-session budget of "
                f"{self.per_session / MIB:.0f} MiB (serve --session-mib)"
            )
        if size > self.total:
            raise OverBudget(
                f"a frame of {size / MIB:.1f} MiB exceeds the daemon's budget of "
                f"{self.total / MIB:.0f} MiB (serve --held-mib)"
            )
        held = self._held.get(session, 0)
        if held - self._draining.get(session, 0) + size > self.per_session:
            raise OverBudget(
                f"the session holds {held / MIB:.1f} MiB of code and shared objects; "
                f"{size / MIB:.1f} MiB more would exceed its budget of {self.per_session / MIB:.0f} MiB"
            )
        if self._all - self._all_draining + size > self.total:
            raise OverBudget(
                f"this peer holds {self._all / MIB:.1f} MiB for its sessions; {size / MIB:.1f} MiB more "
                f"would exceed its budget of {self.total / MIB:.0f} MiB"
            )

    def _take(self, session: str, size: int, draining: bool) -> None:
        self._held[session] = self._held.get(session, 0) + size
        self._all += size
        if draining:
            self._draining[session] = self._draining.get(session, 0) + size
            self._all_draining += size
