"""Authentication middleware and token revocation.

A token proves who the caller is without a database query. Revocation (password
change, account deletion) bumps the account's token version; the current version is
cached in Redis, so checking it costs one Redis GET and, only on a cache miss, one
primary-key read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import falcon
import peewee
import redis

from broker_api.exceptions import InvalidToken, Unauthorized
from broker_api.models import User
from broker_api.tokens import TokenCodec

log = logging.getLogger(__name__)


def _key(user_id: str) -> str:
    return f"cb:tokver:{user_id}"


class TokenVersions:
    """The current token version of each account (0 once it is deleted)."""

    def __init__(self, conn: redis.Redis, ttl: int) -> None:
        self._conn = conn
        self._ttl = ttl

    def current(self, user_id: str) -> int:
        cached = self._conn.get(_key(user_id))
        if cached is not None:
            return int(cached)
        user = User.by_id(user_id)
        version = user.token_version if user else 0
        self._conn.set(_key(user_id), version, ex=self._ttl)
        return version

    def set(self, user_id: str, version: int) -> None:
        """Record a new version (0: deleted). Call after the database commit."""
        self._conn.set(_key(user_id), version, ex=self._ttl)


@dataclass(frozen=True)
class Caller:
    """The authenticated caller of a request (``req.context.caller``)."""

    user_id: str
    token_version: int


class AuthMiddleware:
    """Requires a valid bearer token on every resource not marked ``public = True``."""

    def __init__(self, codec: TokenCodec, versions: TokenVersions) -> None:
        self._codec = codec
        self._versions = versions

    def process_resource(
        self, req: falcon.Request, resp: falcon.Response, resource: Any, params: dict
    ) -> None:
        if resource is None or getattr(resource, "public", False):
            return
        header = req.get_header("Authorization")
        if not header:
            raise Unauthorized("an Authorization: Bearer token is required")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("the Authorization header must be 'Bearer <token>'")
        claims = self._codec.verify(token.strip())
        if claims.version != self._versions.current(claims.user_id):
            raise InvalidToken("token has been revoked")
        req.context.caller = Caller(claims.user_id, claims.version)


class DatabaseMiddleware:
    """Keeps one database connection per worker thread, opened on first use.

    Connections are opened lazily, so never before gunicorn forks (NOTES: a connection
    shared by forked children returns wrong rows). Reusing them saves a connect and
    SQLite's pragmas on every request (about a quarter of a ``GET /v1/users/me``). A
    request that failed closes its connection, so a broken one (database restarted)
    is replaced by the next request instead of failing every later one.
    """

    def __init__(self, database: Any) -> None:
        self._db = database

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: Any, req_succeeded: bool
    ) -> None:
        if not req_succeeded and not self._db.is_closed():
            try:
                self._db.close()
            except peewee.PeeweeException:
                log.warning("could not close a failed request's database connection", exc_info=True)
