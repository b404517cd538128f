"""The API's gateway to the matchmaker: announcing peers, releasing slots, queueing.

It hides one recovery rule from the resources: when Redis has lost the registry, the
registry is rebuilt from the database and the operation retried, so a Redis restart
costs a peer nothing but its next heartbeat.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from rq import Queue

from broker_api.models import User
from matchmaker import keys, recovery
from matchmaker.queue import enqueue_match, request_rematch
from matchmaker.registry import Registry, RegistryLost

T = TypeVar("T")


class Availability:
    def __init__(self, registry: Registry, queue: Queue) -> None:
        self.registry = registry
        self.queue = queue

    def _recovering(self, op: Callable[[], T]) -> T:
        try:
            return op()
        except RegistryLost:
            recovery.ensure_registry(self.registry, self.queue)
            return op()

    def announce(self, user: User) -> None:
        """Publish the account's slots, address and key; counts as a heartbeat."""
        grew = self._recovering(
            lambda: self.registry.announce(
                user.id,
                total=user.jobs,
                address=user.address,
                pub_key=user.pub_key,
                runtime=user.runtime_dict,
            )
        )
        if grew:
            request_rematch(self.queue)

    def withdraw(self, user_id: str) -> None:
        self.registry.withdraw(user_id)

    def release(self, session_id: str, user_id: str | None = None) -> None:
        """Give back a session's slots (or one member's) and retry waiting requests."""
        freed, pending = self._recovering(lambda: self.registry.release(session_id, user_id))
        if freed and pending:
            request_rematch(self.queue)

    def session_ended(self, session_id: str) -> None:
        """A session left the database: stop matching it and tell long-pollers."""
        self.registry.unpend(session_id)
        self.registry.conn.publish(keys.session_channel(session_id), keys.Status.CLOSED.value)

    def request_match(self, session_id: str) -> None:
        enqueue_match(self.queue, session_id)
