"""Where a peer or requester keeps its key pair and broker credentials.

One directory (``$COMPUTE_BROKER_HOME``, default ``~/.config/compute-broker``) holds
``key.pem`` (mode 0600), ``cert.pem`` and ``account.json`` (mode 0600: broker URL,
email, account id and the latest token). No password is ever stored: a peer or pool
logs in again by signing a broker challenge with ``key.pem``. An ``account.json``
written by an older version is rewritten without its password when loaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from peer.errors import PeerError

ACCOUNT_FILE = "account.json"
DEFAULT_BROKER = "http://127.0.0.1:8000"


def default_home() -> Path:
    env = os.environ.get("COMPUTE_BROKER_HOME")
    return Path(env) if env else Path.home() / ".config" / "compute-broker"


def default_broker() -> str:
    return os.environ.get("COMPUTE_BROKER_URL", DEFAULT_BROKER)


def positive_mib(text: str, name: str = "the value") -> int:
    """Parse a size in MiB: a positive whole number, or a `ValueError` naming ``name``."""
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"{name} must be a whole number of MiB, got {text!r}") from None
    if value <= 0:
        raise ValueError(f"{name} must be a positive number of MiB, got {value}")
    return value


@dataclass(frozen=True)
class ServeSettings:
    """Defaults of ``python -m peer serve`` that the environment may set (its flags
    override them): how many MiB of requesters' frames the daemon holds at once for one
    session (``COMPUTE_BROKER_SESSION_MIB``) and for all (``COMPUTE_BROKER_HELD_MIB``);
    see `peer.budget`. One session can then never take more than its share, however
    many connections it opens."""

    session_mib: int = 1024
    held_mib: int = 2048

    def __post_init__(self) -> None:
        for name in ("session_mib", "held_mib"):
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise PeerError(f"{name} must be a positive number of MiB, got {value!r}")
        if self.session_mib > self.held_mib:
            raise PeerError(
                f"the per-session budget ({self.session_mib} MiB) must not exceed the daemon's "
                f"({self.held_mib} MiB): raise --held-mib or lower --session-mib"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **flags: int | None) -> ServeSettings:
        """The settings from ``env`` (default ``os.environ``); ``flags`` that are not
        None (the command line's) take precedence.

        Raises:
            PeerError: a value is not a positive whole number of MiB, or the session's
                budget exceeds the daemon's.
        """
        env = os.environ if env is None else env
        values: dict[str, int] = {}
        for name, var in (
            ("session_mib", "COMPUTE_BROKER_SESSION_MIB"),
            ("held_mib", "COMPUTE_BROKER_HELD_MIB"),
        ):
            if flags.get(name) is not None:
                values[name] = int(flags[name])  # type: ignore[arg-type]
            elif env.get(var, ""):
                try:
                    values[name] = positive_mib(env[var], var)
                except ValueError as exc:
                    raise PeerError(str(exc)) from None
        return cls(**values)


@dataclass
class Account:
    """The broker account a config directory belongs to."""

    broker: str
    email: str
    token: str = ""
    user_id: str = ""

    @classmethod
    def load(cls, home: Path) -> Account:
        path = Path(home) / ACCOUNT_FILE
        if not path.exists():
            raise PeerError(f"no account in {home}; run `python -m peer init` first")
        if path.stat().st_mode & 0o077:
            raise PeerError(f"{path} holds your token and is readable by others; chmod 600 it")
        try:
            data = json.loads(path.read_text())
            account = cls(**{k: str(data[k]) for k in ("broker", "email", "token", "user_id")})
        except (ValueError, KeyError, TypeError) as exc:
            raise PeerError(f"{path} is damaged ({exc}); run `python -m peer init` again") from None
        if "password" in data:
            account.save(home)  # an older version kept the password: drop it
        return account

    def save(self, home: Path) -> None:
        home = Path(home)
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = home / f".{ACCOUNT_FILE}.{os.getpid()}.{os.urandom(4).hex()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(asdict(self), f, indent=1)
            os.replace(tmp, home / ACCOUNT_FILE)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
