"""The app factory: builds the stores and wires them into resources. Nothing else."""

from __future__ import annotations

import falcon
import redis

from broker_api import errors
from broker_api.auth import AuthMiddleware, DatabaseMiddleware, TokenVersions
from broker_api.availability import Availability
from broker_api.challenges import Challenges
from broker_api.health import HealthResource, OpenApiResource
from broker_api.matching.queue import match_queue, probe_queue
from broker_api.matching.registry import Registry
from broker_api.models import bind_database, create_tables
from broker_api.sessions import MembershipResource, SessionResource, SessionsResource
from broker_api.settings import Settings
from broker_api.throttle import LoginThrottle
from broker_api.tokens import TokenCodec, TokenKeys
from broker_api.users import (
    ChallengesResource,
    HeartbeatResource,
    JobsResource,
    MeResource,
    TokensResource,
    UsersResource,
)


def create_app(settings: Settings, *, conn: redis.Redis | None = None) -> falcon.App:
    """Build the WSGI app for ``settings``.

    Binds the database without connecting (connections are per request, after any
    fork) and creates missing tables.

    Args:
        conn: Redis client to use instead of one made from ``settings.redis_url``.
    """
    database = bind_database(settings.database_url)
    create_tables()
    keys = (
        TokenKeys.from_json(settings.token_keys)
        if settings.token_keys
        else TokenKeys.load_or_create(settings.token_key_file)
    )
    codec = TokenCodec(keys, settings.token_ttl)
    if conn is None:
        # Long-polls wait in get_message(), not in a socket read, so a short socket
        # timeout is safe and turns a hung Redis into a prompt 503.
        conn = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=2)
    versions = TokenVersions(conn, settings.token_ttl)
    availability = Availability(
        Registry(conn, stale_after=settings.stale_after), match_queue(conn), probe_queue(conn)
    )
    throttle = LoginThrottle(conn, max_failures=settings.login_max_failures, window=settings.login_window)
    challenges = Challenges(conn, ttl=settings.challenge_ttl, per_client=settings.challenges_per_client)

    app = falcon.App(middleware=[DatabaseMiddleware(database), AuthMiddleware(codec, versions)])
    app.req_options.strip_url_path_trailing_slash = True
    errors.install(app)
    app.add_route("/v1/challenges", ChallengesResource(challenges))
    app.add_route("/v1/users", UsersResource(settings, codec, challenges))
    app.add_route("/v1/tokens", TokensResource(settings, codec, throttle, challenges))
    app.add_route("/v1/users/me", MeResource(settings, codec, versions, availability, throttle, challenges))
    app.add_route("/v1/users/me/jobs", JobsResource(settings, availability))
    app.add_route("/v1/users/me/heartbeat", HeartbeatResource(availability))
    app.add_route("/v1/sessions", SessionsResource(settings, availability))
    app.add_route("/v1/sessions/{session_id}", SessionResource(settings, availability, conn))
    app.add_route("/v1/sessions/{session_id}/workers/me", MembershipResource(availability))
    app.add_route("/v1/health", HealthResource(conn))
    app.add_route("/openapi.json", OpenApiResource())
    return app
