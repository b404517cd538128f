"""Settings of the broker's web API, read once from the environment.

Every process kind has one frozen settings object built by ``from_env()``; no other
module reads ``os.environ``. Defaults make a fresh machine work with no set-up: a SQLite
file and the local Redis served on a unix socket under the data directory (see
``matchmaker.local_redis``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


def data_dir_from(env: Mapping[str, str]) -> Path:
    """The directory holding the default database, token keys and Redis socket."""
    return Path(env.get("COMPUTE_BROKER_DATA", "var")).resolve()


def default_redis_url(data_dir: Path) -> str:
    """URL of the local Redis that ``python -m matchmaker.local_redis`` serves."""
    return f"unix://{data_dir / 'redis.sock'}"


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be 1/0 (true/false, yes/no, on/off), got {raw!r}")


@dataclass(frozen=True)
class Settings:
    """Configuration of one API process.

    Attributes:
        database_url: peewee ``playhouse.db_url`` URL (``sqlite:///path`` or
            ``postgresql://user@host/db``).
        redis_url: Redis holding availability, heartbeats and the matchmaker queue.
        token_key_file: JSON file with the token keys; created atomically on first start
            so that every gunicorn worker and every restart shares it.
        token_keys: the keys themselves (``TOKEN_KEYS``), overriding the file.
        token_ttl: seconds a token stays valid.
        heartbeat_interval: seconds between peer heartbeats; a peer is stale after
            ``stale_after`` seconds without one.
        max_body_bytes: request bodies above this are refused with 413.
        max_wait: cap on ``GET /v1/sessions/{id}?wait=S``.
        login_max_failures: failed logins per email (and ten times that per client
            address) within ``login_window`` seconds before 429.
        scrypt_n: scrypt cost parameter for password hashes.
        challenge_ttl: seconds a key challenge (``POST /v1/challenges``) stays usable.
        challenges_per_client: challenges one client address may get per
            ``challenge_ttl`` seconds before 429.
        max_pending_sessions: pending sessions one account may have at once (429 above).
        max_held_slots: slots the sessions of one account may hold at once; a request
            for more is matched with what fits under the cap (``partial``).
        max_long_polls: concurrent ``?wait=`` requests of one account (429 above).
        long_poll_slots: concurrent long-polls one API process serves; beyond it a
            long-poll is answered at once with the current state, so waiting clients
            never take the threads log-ins and reads need.
        page_size, max_page_size: default and cap of ``GET /v1/sessions?limit=``.
        probe_private: whether address probes may go to loopback, private, link-local,
            shared or reserved IPs (``PROBE_PRIVATE_ADDRESSES``; off by default, on in
            the local stack and the tests).
        probe_timeout: seconds one address probe may take, connect to answer.
        probe_window: seconds of the probe rate limits' window.
        probes_per_account: probes one account may cause per window.
        probes_per_target: probes the broker sends to one ``ip:port`` per window,
            whichever accounts announce it.
        probes_per_ip: probes to all ports of one IP per window, so that many accounts
            together cannot make the broker scan a machine's ports.
    """

    database_url: str
    redis_url: str
    token_key_file: Path
    token_keys: str | None = None
    token_ttl: int = 3600
    heartbeat_interval: int = 10
    max_body_bytes: int = 64 * 1024
    max_wait: int = 30
    login_max_failures: int = 5
    login_window: int = 300
    scrypt_n: int = 2**14
    challenge_ttl: int = 60
    challenges_per_client: int = 600
    max_pending_sessions: int = 100
    max_held_slots: int = 128
    max_long_polls: int = 100
    long_poll_slots: int = 8
    page_size: int = 50
    max_page_size: int = 200
    probe_private: bool = False
    probe_timeout: float = 2.0
    probe_window: int = 60
    probes_per_account: int = 10
    probes_per_target: int = 2
    probes_per_ip: int = 64

    @property
    def stale_after(self) -> int:
        """Seconds without heartbeat after which a peer is not matched."""
        return 3 * self.heartbeat_interval

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from environment variables (see README, Configuration)."""
        env = os.environ if env is None else env
        data = data_dir_from(env)
        return cls(
            database_url=env.get("DATABASE_URL") or f"sqlite:///{data / 'broker.db'}",
            redis_url=env.get("REDIS_URL") or default_redis_url(data),
            token_key_file=Path(env.get("TOKEN_KEY_FILE") or data / "token-keys.json"),
            token_keys=env.get("TOKEN_KEYS") or None,
            token_ttl=_int(env, "TOKEN_TTL", 3600),
            heartbeat_interval=_int(env, "HEARTBEAT_INTERVAL", 10),
            max_body_bytes=_int(env, "MAX_BODY_BYTES", 64 * 1024),
            max_wait=_int(env, "MAX_WAIT", 30),
            login_max_failures=_int(env, "LOGIN_MAX_FAILURES", 5),
            login_window=_int(env, "LOGIN_WINDOW", 300),
            scrypt_n=_int(env, "SCRYPT_N", 2**14),
            challenge_ttl=_int(env, "CHALLENGE_TTL", 60),
            challenges_per_client=_int(env, "CHALLENGES_PER_CLIENT", 600),
            max_pending_sessions=_int(env, "MAX_PENDING_SESSIONS", 100),
            max_held_slots=_int(env, "MAX_HELD_SLOTS", 128),
            max_long_polls=_int(env, "MAX_LONG_POLLS", 100),
            long_poll_slots=_int(env, "LONG_POLL_SLOTS", 8),
            page_size=_int(env, "PAGE_SIZE", 50),
            max_page_size=_int(env, "MAX_PAGE_SIZE", 200),
            probe_private=_bool(env, "PROBE_PRIVATE_ADDRESSES", False),
            probe_timeout=_float(env, "PROBE_TIMEOUT", 2.0),
            probe_window=_int(env, "PROBE_WINDOW", 60),
            probes_per_account=_int(env, "PROBES_PER_ACCOUNT", 10),
            probes_per_target=_int(env, "PROBES_PER_TARGET", 2),
            probes_per_ip=_int(env, "PROBES_PER_IP", 64),
        )
