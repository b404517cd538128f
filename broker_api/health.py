"""``GET /v1/health`` and ``GET /openapi.json``: public, cheap, for probes and clients."""

from __future__ import annotations

import falcon
import peewee
import redis

from broker_api.models import db
from broker_api.openapi import build_document


class HealthResource:
    """200 when the database and Redis both answer, else 503 saying which does not."""

    public = True

    def __init__(self, conn: redis.Redis) -> None:
        self._conn = conn

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        database = redis_state = "ok"
        try:
            db.execute_sql("SELECT 1")
        except (peewee.PeeweeException, OSError) as exc:
            database = f"unreachable: {type(exc).__name__}"
        try:
            self._conn.ping()
        except (redis.RedisError, OSError) as exc:
            redis_state = f"unreachable: {type(exc).__name__}"
        healthy = database == "ok" and redis_state == "ok"
        resp.status = falcon.HTTP_200 if healthy else falcon.HTTP_503
        resp.media = {
            "status": "ok" if healthy else "unavailable",
            "database": database,
            "redis": redis_state,
        }


class OpenApiResource:
    public = True

    def __init__(self) -> None:
        self._doc = build_document()

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = self._doc
