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
