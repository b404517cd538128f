"""The one place that maps errors to HTTP statuses.

Domain errors (``broker_api.exceptions``), database and Redis failures all become a
JSON ``{"title", "description"}`` with the right status; anything unexpected is logged
with its traceback and answered 500 without one.
"""

from __future__ import annotations

import logging
from typing import Any

import falcon
import peewee
import redis

from broker_api import exceptions as exc

log = logging.getLogger(__name__)

STATUS: dict[type[exc.BrokerError], int] = {
    exc.InvalidRequest: 400,
    exc.Unauthorized: 401,
    exc.Forbidden: 403,
    exc.NotFound: 404,
    exc.Conflict: 409,
    exc.LengthRequired: 411,
    exc.PayloadTooLarge: 413,
    exc.UnsupportedMediaType: 415,
    exc.TooManyRequests: 429,
    exc.Unavailable: 503,
}


def _status_of(error: exc.BrokerError) -> int:
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]  # type: ignore[index]
    return 500


def _broker_error(req: falcon.Request, resp: falcon.Response, error: exc.BrokerError, params: Any) -> None:
    status = _status_of(error)
    headers: dict[str, str] = {}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
    if isinstance(error, exc.TooManyRequests):
        headers["Retry-After"] = str(error.retry_after)
    raise falcon.HTTPError(
        falcon.code_to_http_status(status),
        title=error.title,
        description=error.description,
        headers=headers,
    )


def _unavailable(req: falcon.Request, resp: falcon.Response, error: Exception, params: Any) -> None:
    log.warning("backing service unavailable: %s", error)
    service = "Redis" if isinstance(error, redis.RedisError) else "the database"
    raise falcon.HTTPServiceUnavailable(
        title="Service unavailable", description=f"{service} cannot be reached; retry shortly"
    )


def _not_found(req: falcon.Request, resp: falcon.Response, error: Exception, params: Any) -> None:
    raise falcon.HTTPNotFound(title="Not found", description="no such resource")


def _conflict(req: falcon.Request, resp: falcon.Response, error: Exception, params: Any) -> None:
    raise falcon.HTTPConflict(title="Conflict", description="the request conflicts with existing data")


def _unexpected(req: falcon.Request, resp: falcon.Response, error: Exception, params: Any) -> None:
    if isinstance(error, falcon.HTTPError):
        raise error
    log.exception("unhandled error on %s %s", req.method, req.path)
    raise falcon.HTTPInternalServerError(
        title="Internal error", description="the request failed; it was logged"
    )


def install(app: falcon.App) -> None:
    """Register every error handler on ``app`` (least specific first)."""
    app.add_error_handler(Exception, _unexpected)
    app.add_error_handler(exc.BrokerError, _broker_error)
    app.add_error_handler(peewee.DoesNotExist, _not_found)
    app.add_error_handler(peewee.IntegrityError, _conflict)
    app.add_error_handler(peewee.OperationalError, _unavailable)
    app.add_error_handler(peewee.InterfaceError, _unavailable)
    app.add_error_handler(redis.ConnectionError, _unavailable)
    app.add_error_handler(redis.TimeoutError, _unavailable)
