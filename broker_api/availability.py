"""The API's gateway to the matchmaker: announcing peers, releasing slots, queueing.

It hides one recovery rule from the resources: when Redis has lost the registry, the
registry is rebuilt from the database and the operation retried, so a Redis restart
costs a peer nothing but its next heartbeat.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from rq import Queue

from broker_api.matching import keys, recovery
from broker_api.matching.keys import ProofState
from broker_api.matching.queue import enqueue_match, enqueue_probe, request_rematch
from broker_api.matching.registry import Proof, Registry, RegistryLost
from broker_api.models import User

T = TypeVar("T")


class Availability:
    """Args: the registry, the matchmaker's queue and the address probes' queue."""

    def __init__(self, registry: Registry, queue: Queue, probes: Queue) -> None:
        self.registry = registry
        self.queue = queue
        self.probes = probes

    def _recovering(self, op: Callable[[], T]) -> T:
        try:
            return op()
        except RegistryLost:
            recovery.ensure_registry(self.registry, self.queue)
            return op()

    def announce(self, user: User, *, explicit: bool = False) -> None:
        """Publish the account's slots, address and key; counts as a heartbeat.

        A new address or key is probed (in the matchmaker, not here) before the peer
        is matched; ``explicit`` (the host setting its slots) retries a failed probe.
        """
        announced = self._recovering(
            lambda: self.registry.announce(
                user.id,
                total=user.jobs,
                address=user.address,
                pub_key=user.pub_key,
                runtime=user.runtime_dict,
                explicit=explicit,
            )
        )
        if announced.probe:
            enqueue_probe(self.probes, user.id, announced.probe)
        if announced.rematch:
            request_rematch(self.queue)

    def unproven(self, workers: list[tuple[str, str, str]]) -> set[str]:
        """Ids among ``(id, address, pubKey)`` now announcing an address not proven."""
        return self.registry.unproven(workers) if workers else set()

    def proof(self, user: User) -> Proof:
        """Where the account's address proof stands, for the host to see."""
        info = self.registry.peer(user.id)
        if info is None or info.address != user.address or info.pub_key != user.pub_key:
            return Proof(ProofState.UNPROVEN.value, "", None)
        return info.proof

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
