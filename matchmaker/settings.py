"""Settings of a matchmaker process, read once from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from broker_api.settings import Settings as ApiSettings


@dataclass(frozen=True)
class Settings:
    """Configuration of one matchmaker worker.

    The matchmaker shares the database, Redis and heartbeat configuration with the API
    (it reads the same variables), so it is derived from the API's settings.
    """

    database_url: str
    redis_url: str
    heartbeat_interval: int
    max_held_slots: int = 128
    probe_private: bool = False
    probe_timeout: float = 2.0
    probe_window: int = 60
    probes_per_account: int = 10
    probes_per_target: int = 2
    probes_per_ip: int = 64

    @property
    def stale_after(self) -> int:
        return 3 * self.heartbeat_interval

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        api = ApiSettings.from_env(os.environ if env is None else env)
        return cls(
            api.database_url,
            api.redis_url,
            api.heartbeat_interval,
            max_held_slots=api.max_held_slots,
            probe_private=api.probe_private,
            probe_timeout=api.probe_timeout,
            probe_window=api.probe_window,
            probes_per_account=api.probes_per_account,
            probes_per_target=api.probes_per_target,
            probes_per_ip=api.probes_per_ip,
        )
