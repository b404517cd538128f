"""Session resources: request a pool, list, read (long-poll), end, leave.

Sessions are visible to their owner and their members only; to anyone else a session
does not exist (404), so ids reveal nothing.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from typing import Any

import falcon
import redis

from broker_api import schemas
from broker_api.availability import Availability
from broker_api.bodies import read_json
from broker_api.exceptions import Forbidden, InvalidRequest, NotFound, TooManyRequests, Unavailable
from broker_api.matching import keys
from broker_api.matching.keys import Status
from broker_api.models import Member, Session, User, db
from broker_api.settings import Settings

DEFAULT_TIMEOUT = 30
#: Statuses a long-poll may wait on (``?since=``).
_STATUSES = frozenset(s.value for s in Status)


#: Ids are ``uuid4().hex``. Anything else is answered 404 before it reaches the
#: database (PostgreSQL rejects NUL bytes in text with an error, not a miss), with the
#: same body as an id that exists but is not the caller's.
_ID = re.compile(r"[0-9a-f]{32}")


#: ``GET /v1/sessions`` cursor: the last row's ``createdAt`` (repr of a float) and id.
_CURSOR = re.compile(r"(\d{1,12}(?:\.\d{1,20})?):([0-9a-f]{32})")


def _check_id(session_id: str) -> None:
    if not _ID.fullmatch(session_id):
        raise NotFound("no such session")


def session_view(
    session: Session, viewer_id: str, availability: Availability, *, new: bool = False
) -> dict[str, Any]:
    """A session as its owner (all workers) or a member (only itself) sees it.

    The owner is not shown workers that announce an address not proven now: a host that
    moved after it was matched is left out until its new address is proven too, so no
    requester is sent to an address its host has not proven. (After Redis lost its data,
    a worker the registry has no announcement of is shown, as it was proven when it
    was matched; its next heartbeat announces it and is probed.)

    ``new``: the session was just created by the viewer, so it has no workers yet (its
    members are not queried).
    """
    role = "owner" if session.owner_id == viewer_id else "member"
    owner = User.by_id(session.owner_id)
    if owner is None:
        raise NotFound("no such session")
    workers = []
    if not new:
        rows = Member.select(Member, User).join(User).where(Member.session == session.id).order_by(User.id)
        if role == "member":
            rows = rows.where(Member.user == viewer_id)
        members = list(rows)
        if role == "owner":
            hidden = availability.unproven([(m.user.id, m.user.address, m.user.pub_key) for m in members])
            members = [m for m in members if m.user.id not in hidden]
        workers = [
            {"id": m.user.id, "address": m.user.address, "pubKey": m.user.pub_key, "slots": m.slots}
            for m in members
        ]
    return {
        "id": session.id,
        "status": session.status,
        "role": role,
        "requestedWorkers": session.workers,
        "minWorkers": session.min_workers,
        "timeout": session.timeout,
        "runtime": session.runtime_dict,
        "createdAt": session.created_at,
        "updatedAt": session.updated_at,
        "deadline": session.deadline,
        "owner": {"id": owner.id, "pubKey": owner.pub_key},
        "workers": workers,
        "slots": sum(w["slots"] for w in workers),
    }


def _visible(session_id: str, user_id: str) -> Session:
    """The session if the caller owns it or works in it; otherwise NotFound."""
    _check_id(session_id)
    session = Session.get_or_none(Session.id == session_id)
    if session is None:
        raise NotFound("no such session")
    if session.owner_id != user_id and not (
        Member.select().where(Member.session == session_id, Member.user == user_id).exists()
    ):
        raise NotFound("no such session")
    return session


class SessionsResource:
    """``/v1/sessions``: request a pool (queued for the matchmaker) or list sessions."""

    def __init__(self, settings: Settings, availability: Availability) -> None:
        self._settings = settings
        self._availability = availability

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = read_json(req, schemas.CREATE_SESSION, max_bytes=self._settings.max_body_bytes)
        workers = int(body["workers"])
        min_workers = int(body.get("minWorkers", workers))
        if min_workers > workers:
            raise InvalidRequest("field 'minWorkers' must not exceed 'workers'")
        timeout = int(body.get("timeout", DEFAULT_TIMEOUT))
        owner = req.context.caller.user_id
        # The count and the insert run under a per-account lock in Redis, so a burst of
        # concurrent requests cannot slip past the cap between the two.
        lock = self._availability.registry.conn.lock(keys.post_lock(owner), timeout=10)
        try:
            if not lock.acquire(blocking_timeout=5):
                raise TooManyRequests("too many concurrent pool requests from this account", retry_after=1)
        except redis.RedisError:
            raise Unavailable("the matchmaker queue cannot be reached; retry shortly") from None
        try:
            session = self._create(owner, body, workers, min_workers, timeout)
        finally:
            try:
                lock.release()
            except redis.RedisError:
                pass  # it expires by itself
        try:
            self._availability.request_match(session.id)
        except redis.RedisError:
            # Nothing is written when the request cannot be queued.
            session.delete_instance()
            raise Unavailable("the matchmaker queue cannot be reached; retry shortly") from None
        resp.status = falcon.HTTP_202
        resp.location = f"/v1/sessions/{session.id}"
        resp.media = session_view(session, owner, self._availability, new=True)

    def _create(
        self, owner: str, body: dict[str, Any], workers: int, min_workers: int, timeout: int
    ) -> Session:
        pending = (
            Session.select().where(Session.owner == owner, Session.status == Status.PENDING.value).count()
        )
        if pending >= self._settings.max_pending_sessions:
            raise TooManyRequests(
                f"this account already has {pending} pending pool requests "
                f"(at most {self._settings.max_pending_sessions})",
                retry_after=max(1, min(DEFAULT_TIMEOUT, self._settings.max_wait)),
            )
        now = time.time()
        with db.atomic():
            return Session.create(
                owner=owner,
                workers=workers,
                min_workers=min_workers,
                timeout=timeout,
                runtime=json.dumps(body.get("runtime", {}), sort_keys=True),
                created_at=now,
                updated_at=now,
                deadline=now + timeout,
            )

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """One page of the caller's sessions, newest first.

        ``?limit=`` (default ``page_size``, at most ``max_page_size``), ``?cursor=`` (the
        ``next`` of the previous page) and ``?status=`` (comma-separated) bound what one
        call costs however many sessions an account has.
        """
        user_id = req.context.caller.user_id
        limit = self._limit(req)
        member_of = Member.select(Member.session).where(Member.user == user_id)
        query = Session.select().where((Session.owner == user_id) | (Session.id.in_(member_of)))
        raw_status = req.get_param("status")
        if raw_status is not None:
            wanted = raw_status.split(",")
            if not wanted or any(w not in _STATUSES for w in wanted):
                raise InvalidRequest(
                    f"query parameter 'status' must list some of {', '.join(sorted(_STATUSES))}"
                )
            query = query.where(Session.status.in_(wanted))
        cursor = req.get_param("cursor")
        if cursor is not None:
            m = _CURSOR.fullmatch(cursor)
            if m is None:
                raise InvalidRequest("query parameter 'cursor' must be the 'next' of a previous page")
            created, last_id = float(m.group(1)), m.group(2)
            query = query.where(
                (Session.created_at < created) | ((Session.created_at == created) & (Session.id < last_id))
            )
        rows = list(query.order_by(Session.created_at.desc(), Session.id.desc()).limit(limit + 1))
        page = rows[:limit]
        body: dict[str, Any] = {"sessions": [session_view(s, user_id, self._availability) for s in page]}
        if len(rows) > limit:
            body["next"] = f"{page[-1].created_at!r}:{page[-1].id}"
        resp.media = body

    def _limit(self, req: falcon.Request) -> int:
        raw = req.get_param("limit")
        if raw is None:
            return self._settings.page_size
        if not raw.isdigit() or not 1 <= int(raw) <= self._settings.max_page_size:
            raise InvalidRequest(
                f"query parameter 'limit' must be an integer from 1 to {self._settings.max_page_size}"
            )
        return int(raw)


class SessionResource:
    """``/v1/sessions/{id}``: read (optionally long-poll) or end a session."""

    def __init__(self, settings: Settings, availability: Availability, conn: redis.Redis) -> None:
        self._settings = settings
        self._availability = availability
        self._conn = conn
        # This process's share of threads for long-polls: beyond it a long-poll is
        # answered at once, so log-ins and reads always find a free thread.
        self._polls = threading.BoundedSemaphore(max(1, settings.long_poll_slots))

    def _wait_param(self, req: falcon.Request) -> float:
        raw = req.get_param("wait")
        if raw is None:
            return 0.0
        try:
            wait = float(raw)
        except ValueError:
            raise InvalidRequest("query parameter 'wait' must be a number of seconds") from None
        if not math.isfinite(wait) or wait < 0:
            raise InvalidRequest("query parameter 'wait' must be a non-negative number")
        return min(wait, float(self._settings.max_wait))

    def on_get(self, req: falcon.Request, resp: falcon.Response, session_id: str) -> None:
        user_id = req.context.caller.user_id
        wait = self._wait_param(req)
        since = req.get_param("since") or Status.PENDING.value
        if since not in _STATUSES:
            raise InvalidRequest(f"query parameter 'since' must be one of {', '.join(sorted(_STATUSES))}")
        session = _visible(session_id, user_id)
        if wait > 0 and session.status == since:
            session = self._bounded_poll(session, user_id, wait, since)
        resp.media = session_view(session, user_id, self._availability)

    def _bounded_poll(self, session: Session, user_id: str, wait: float, since: str) -> Session:
        """Long-poll within the account's cap (429) and this process's share of threads
        (beyond it: the current state at once)."""
        counter = keys.long_polls(user_id)
        try:
            pipe = self._conn.pipeline(transaction=True)
            pipe.incr(counter)
            pipe.expire(counter, int(self._settings.max_wait) + 60)
            count = int(pipe.execute()[0])
        except redis.RedisError:
            raise Unavailable("Redis cannot be reached; retry shortly") from None
        try:
            if count > self._settings.max_long_polls:
                raise TooManyRequests(
                    f"this account already waits on {self._settings.max_long_polls} long-polls",
                    retry_after=max(1, min(5, self._settings.max_wait)),
                )
            if not self._polls.acquire(blocking=False):
                return session
            try:
                return self._long_poll(session, user_id, wait, since)
            finally:
                self._polls.release()
        finally:
            try:
                self._conn.decr(counter)
            except redis.RedisError:
                pass  # the counter expires by itself

    def _long_poll(self, session: Session, user_id: str, wait: float, since: str) -> Session:
        """Wait up to ``wait`` seconds for the status to differ from ``since``.

        The client says which status it last saw (default ``pending``), so a change
        that lands between its previous read and this request returns at once instead
        of being waited past. Subscribes before re-reading the status, so a change
        published in between is not missed; the database connection is released while
        waiting.
        """
        deadline = time.monotonic() + wait
        pubsub = self._conn.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(keys.session_channel(session.id))
            current = _visible(session.id, user_id)
            while current.status == since:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                db.close()
                message = pubsub.get_message(timeout=remaining)
                if message is not None:
                    current = _visible(session.id, user_id)
            return current
        finally:
            pubsub.close()

    def on_delete(self, req: falcon.Request, resp: falcon.Response, session_id: str) -> None:
        session = _visible(session_id, req.context.caller.user_id)
        if session.owner_id != req.context.caller.user_id:
            raise Forbidden("only the session's owner can end it; members leave via workers/me")
        # Close before releasing: if Redis fails in between, a rebuild will not count
        # this session's slots as held, and a retried DELETE finishes the job.
        with db.atomic():
            Session.update(status=Status.CLOSED.value, updated_at=time.time()).where(
                Session.id == session_id
            ).execute()
        self._availability.release(session_id)
        with db.atomic():
            Session.delete().where(Session.id == session_id).execute()
        self._availability.session_ended(session_id)
        resp.status = falcon.HTTP_204


class MembershipResource:
    """``DELETE /v1/sessions/{id}/workers/me``: the caller's peer leaves a session."""

    def __init__(self, availability: Availability) -> None:
        self._availability = availability

    def on_delete(self, req: falcon.Request, resp: falcon.Response, session_id: str) -> None:
        user_id = req.context.caller.user_id
        _check_id(session_id)
        with db.atomic():
            left = Member.delete().where(Member.session == session_id, Member.user == user_id).execute()
        if not left:
            raise NotFound("no such session among those you work in")
        self._availability.release(session_id, user_id)
        resp.status = falcon.HTTP_204
