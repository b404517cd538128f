"""The broker's HTTP API as the peer daemon and the requester library use it.

One small client over ``requests`` (connection reuse, timeouts on every call). Errors
come back as `BrokerError` carrying the status and the broker's description, and an
unreachable broker as `BrokerUnreachable` with the URL, so the CLI can print one line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import requests

from peer.errors import PeerError

if TYPE_CHECKING:
    from peer.identity import Identity


class BrokerError(PeerError):
    """The broker answered with an error status."""

    def __init__(self, status: int, title: str, description: str = "") -> None:
        self.status, self.title, self.description = status, title, description
        super().__init__(f"broker said {status} {title}" + (f": {description}" if description else ""))


class BrokerUnreachable(PeerError):
    """No answer from the broker at all."""


class BrokerClient:
    """Calls to one broker, with an optional bearer token.

    Args:
        url: The broker's base URL, e.g. ``http://127.0.0.1:8000``.
        token: A token from `login` or `signup`; set later with ``client.token = ...``.
        timeout: Seconds to wait for an answer (long-polls add their wait to it).
        identity: The key pair that signs broker challenges: to sign up, to log in by
            key, and to prove changes of key or address.
    """

    def __init__(
        self, url: str, token: str | None = None, *, timeout: float = 15.0, identity: Identity | None = None
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.identity = identity
        self._http = requests.Session()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, *, wait: float = 0.0, **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        for attempt in (1, 2):
            try:
                r = self._http.request(
                    method, self.url + path, headers=headers, timeout=self.timeout + wait, **kwargs
                )
                break
            except requests.Timeout:
                raise BrokerUnreachable(f"the broker at {self.url} did not answer in time") from None
            except requests.ConnectionError as exc:
                # gunicorn closes idle keep-alive connections after 2 s; a request sent
                # on one just as it closes is aborted before the server read it, so a
                # second try on a fresh connection is safe, for every method.
                if attempt == 1 and "Connection aborted" in str(exc):
                    continue
                raise BrokerUnreachable(f"cannot reach the broker at {self.url}: {_reason(exc)}") from None
        if r.status_code >= 400:
            try:
                body = r.json()
            except ValueError:
                body = {}
            raise BrokerError(r.status_code, body.get("title", r.reason), body.get("description", ""))
        return r.json() if r.content else None

    # -- accounts ---------------------------------------------------------------
    def _identity(self) -> Identity:
        if self.identity is None:
            raise PeerError("no key pair to sign the broker's challenge with (BrokerClient(identity=...))")
        return self.identity

    def challenge(self) -> str:
        """A fresh single-use challenge for a key to sign."""
        return self._call("POST", "/v1/challenges")["challenge"]

    def signup(self, email: str, password: str, pub_key: str, address: str) -> dict[str, Any]:
        """Create an account, proving ``pub_key`` with the client's identity, and keep its token."""
        identity = self._identity()
        if pub_key != identity.public_key:
            raise PeerError("signup: pub_key must be the public key of the client's identity")
        challenge = self.challenge()
        body = {
            "email": email,
            "password": password,
            "pubKey": pub_key,
            "address": address,
            "challenge": challenge,
            "signature": identity.sign("register", challenge, email.strip().lower()),
        }
        user = self._call("POST", "/v1/users", json=body)
        self.token = user["token"]
        return user

    def login(self, email: str, password: str | None = None) -> str:
        """Get (and keep) a fresh token: by password if given, else by the identity's key
        (a signed challenge, which failed password guesses never throttle)."""
        if password is not None:
            body = {"email": email, "password": password}
        else:
            challenge = self.challenge()
            body = {
                "email": email,
                "challenge": challenge,
                "signature": self._identity().sign("login", challenge, email.strip().lower()),
            }
        self.token = self._call("POST", "/v1/tokens", json=body)["token"]
        return self.token

    def me(self) -> dict[str, Any]:
        return self._call("GET", "/v1/users/me")

    def update_me(self, **fields: str) -> dict[str, Any]:
        """PATCH the account: ``pubKey``, ``address``, ``password``.

        Proof is added from the identity: ``signature`` by the new key when ``pubKey``
        is given, and unless ``currentPassword`` is, ``currentSignature`` by the
        registered key (the identity's: it must be the one registered).
        """
        if self.identity is not None and {"pubKey", "address", "password"} & set(fields):
            challenge = self.challenge()
            user_id = self.me()["id"]
            fields = {**fields, "challenge": challenge}
            if "pubKey" in fields:
                fields["signature"] = self.identity.sign("set-key", challenge, user_id)
            if "currentPassword" not in fields:
                fields["currentSignature"] = self.identity.sign("update", challenge, user_id)
        return self._call("PATCH", "/v1/users/me", json=fields)

    def set_jobs(self, jobs: int, runtime: dict[str, str] | None = None) -> int:
        body: dict[str, Any] = {"jobs": jobs}
        if runtime:
            body["runtime"] = runtime
        return self._call("POST", "/v1/users/me/jobs", json=body)["jobs"]

    def heartbeat(self) -> None:
        self._call("POST", "/v1/users/me/heartbeat")

    # -- sessions ---------------------------------------------------------------
    def request_pool(
        self, workers: int, *, min_workers: int | None = None, timeout: int = 30, runtime: dict[str, str]
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"workers": workers, "timeout": timeout, "runtime": runtime}
        if min_workers is not None:
            body["minWorkers"] = min_workers
        return self._call("POST", "/v1/sessions", json=body)

    def session(self, session_id: str, *, wait: float = 0.0) -> dict[str, Any]:
        """Read a session; with ``wait``, long-poll until its status changes."""
        params = {"wait": wait} if wait else None
        return self._call("GET", f"/v1/sessions/{session_id}", wait=wait, params=params)

    def sessions(self, *, status: str | None = None) -> list[dict[str, Any]]:
        """Every session of the account (only ``status``, comma-separated, if given),
        read page by page."""
        params: dict[str, str] = {"limit": "200"}
        if status:
            params["status"] = status
        out: list[dict[str, Any]] = []
        while True:
            page = self._call("GET", "/v1/sessions", params=params)
            out += page["sessions"]
            if not page.get("next"):
                return out
            params["cursor"] = page["next"]

    def end_session(self, session_id: str) -> None:
        self._call("DELETE", f"/v1/sessions/{session_id}")

    def leave_session(self, session_id: str) -> None:
        self._call("DELETE", f"/v1/sessions/{session_id}/workers/me")


def _reason(exc: Exception) -> str:
    text = str(exc)
    for marker in ("Connection refused", "Name or service not known", "timed out", "No route to host"):
        if marker in text:
            return marker.lower()
    return text[:200]
