"""The broker's error hierarchy, free of any web framework.

Domain code raises these; ``broker_api.errors`` is the one place that turns them (and
database and token errors) into HTTP statuses.
"""

from __future__ import annotations


class BrokerError(Exception):
    """Base of every error the broker reports to a caller.

    Attributes:
        title: short, stable summary shown as the JSON error's ``title``.
        description: what exactly was wrong, safe to show to the caller.
    """

    title = "Broker error"

    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description


class InvalidRequest(BrokerError):
    """The body or query is malformed or a field is invalid (400)."""

    title = "Invalid request"


class Unauthorized(BrokerError):
    """Missing, invalid, expired or revoked credentials (401)."""

    title = "Unauthorized"


class InvalidToken(Unauthorized):
    """A token failed to decrypt, verify, or is expired or revoked."""

    title = "Invalid token"


class Forbidden(BrokerError):
    """The caller may see the resource but not do this to it (403)."""

    title = "Forbidden"


class NotFound(BrokerError):
    """Absent, or not the caller's to see: the two are never told apart (404)."""

    title = "Not found"


class Conflict(BrokerError):
    """The request clashes with existing state, e.g. an email already taken (409)."""

    title = "Conflict"


class LengthRequired(BrokerError):
    """A body without Content-Length that this server cannot read safely (411)."""

    title = "Length required"


class PayloadTooLarge(BrokerError):
    """The request body exceeds the configured cap (413)."""

    title = "Payload too large"


class UnsupportedMediaType(BrokerError):
    """The request body is not ``application/json`` (415)."""

    title = "Unsupported media type"


class TooManyRequests(BrokerError):
    """Too many failed logins; retry after ``retry_after`` seconds (429)."""

    title = "Too many requests"

    def __init__(self, description: str, retry_after: int) -> None:
        super().__init__(description)
        self.retry_after = retry_after


class Unavailable(BrokerError):
    """A backing service (database, Redis) cannot be reached (503)."""

    title = "Service unavailable"
