"""Account resources: sign-up, log-in, own account, jobs wanted, heartbeat."""

from __future__ import annotations

import json
from typing import Any

import falcon
import peewee
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from broker_api import schemas
from broker_api.auth import TokenVersions
from broker_api.availability import Availability
from broker_api.bodies import read_json
from broker_api.exceptions import Conflict, Forbidden, InvalidRequest, NotFound, Unauthorized
from broker_api.models import Member, Session, User, db
from broker_api.passwords import DUMMY_HASH, hash_password, verify_password
from broker_api.settings import Settings
from broker_api.throttle import LoginThrottle
from broker_api.tokens import TokenCodec
from matchmaker.keys import Status


def user_view(user: User) -> dict[str, Any]:
    return {
        "id": user.id,
        "email": user.email,
        "pubKey": user.pub_key,
        "address": user.address,
        "jobs": user.jobs,
        "runtime": user.runtime_dict,
        "createdAt": user.created_at,
    }


def _check_pub_key(pem: str) -> str:
    try:
        load_pem_public_key(pem.encode())
    except (ValueError, TypeError):
        raise InvalidRequest("field 'pubKey' must be a PEM-encoded public key") from None
    return pem.strip() + "\n"


def _check_address(address: str) -> str:
    port = int(address.rsplit(":", 1)[1])
    if not 1 <= port <= 65535:
        raise InvalidRequest("field 'address' must end in a port from 1 to 65535")
    return address


def _normalize_email(email: str) -> str:
    return email.strip().lower()


def _me(req: falcon.Request) -> User:
    """The caller's account (it existed when the token was checked, a moment ago)."""
    user = User.by_id(req.context.caller.user_id)
    if user is None:
        raise NotFound("no such account")
    return user


class UsersResource:
    """``POST /v1/users``: create an account and return it with a first token."""

    public = True

    def __init__(self, settings: Settings, codec: TokenCodec) -> None:
        self._settings = settings
        self._codec = codec

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = read_json(req, schemas.CREATE_USER, max_bytes=self._settings.max_body_bytes)
        email = _normalize_email(body["email"])
        pub_key = _check_pub_key(body["pubKey"])
        address = _check_address(body["address"])
        if User.select().where(User.email == email).exists():
            raise Conflict(f"an account with email {email!r} already exists")
        password_hash = hash_password(body["password"], n=self._settings.scrypt_n)
        try:
            with db.atomic():
                user = User.create(email=email, password_hash=password_hash, pub_key=pub_key, address=address)
        except peewee.IntegrityError:
            raise Conflict(f"an account with email {email!r} already exists") from None
        token, expires = self._codec.issue(user.id, user.token_version)
        resp.status = falcon.HTTP_201
        resp.location = "/v1/users/me"
        resp.media = {**user_view(user), "token": token, "expiresAt": expires}


class TokensResource:
    """``POST /v1/tokens``: log in with email and password, throttled on failures."""

    public = True

    def __init__(self, settings: Settings, codec: TokenCodec, throttle: LoginThrottle) -> None:
        self._settings = settings
        self._codec = codec
        self._throttle = throttle

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = read_json(req, schemas.LOGIN, max_bytes=self._settings.max_body_bytes)
        email = _normalize_email(body["email"])
        client = req.remote_addr or "unknown"
        self._throttle.check(email, client)
        user = User.get_or_none(User.email == email)
        # Verify against a dummy hash for unknown emails: same cost, no enumeration.
        ok = verify_password(body["password"], user.password_hash if user else DUMMY_HASH)
        if not ok or user is None:
            self._throttle.failed(email, client)
            raise Unauthorized("wrong email or password")
        self._throttle.succeeded(email)
        token, expires = self._codec.issue(user.id, user.token_version)
        resp.status = falcon.HTTP_201
        resp.media = {"token": token, "expiresAt": expires}


class MeResource:
    """``/v1/users/me``: read, update or delete the caller's account."""

    def __init__(
        self, settings: Settings, codec: TokenCodec, versions: TokenVersions, availability: Availability
    ) -> None:
        self._settings = settings
        self._codec = codec
        self._versions = versions
        self._availability = availability

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = user_view(_me(req))

    def on_patch(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = read_json(req, schemas.UPDATE_USER, max_bytes=self._settings.max_body_bytes)
        if set(body) == {"currentPassword"}:
            raise InvalidRequest("nothing to update: give pubKey, address or password")
        user = _me(req)
        if "pubKey" in body:
            user.pub_key = _check_pub_key(body["pubKey"])
        if "address" in body:
            user.address = _check_address(body["address"])
        new_token: dict[str, Any] = {}
        if "password" in body:
            if not verify_password(body["currentPassword"], user.password_hash):
                raise Forbidden("currentPassword is wrong")
            user.password_hash = hash_password(body["password"], n=self._settings.scrypt_n)
            user.token_version += 1
        with db.atomic():
            user.save()
        if "password" in body:
            self._versions.set(user.id, user.token_version)
            token, expires = self._codec.issue(user.id, user.token_version)
            new_token = {"token": token, "expiresAt": expires}
        if user.jobs and ("pubKey" in body or "address" in body):
            self._availability.announce(user)
        resp.media = {**user_view(user), **new_token}

    def on_delete(self, req: falcon.Request, resp: falcon.Response) -> None:
        user_id = req.context.caller.user_id
        owned = [s.id for s in Session.select(Session.id).where(Session.owner == user_id)]
        worked = [m.session_id for m in Member.select(Member.session).where(Member.user == user_id)]
        with db.atomic():
            # Close first: a session that is not open holds no slots after a rebuild.
            Session.update(status=Status.CLOSED.value).where(Session.owner == user_id).execute()
            User.update(token_version=User.token_version + 1).where(User.id == user_id).execute()
        self._versions.set(user_id, 0)
        for session_id in owned:
            self._availability.release(session_id)
        for session_id in worked:
            self._availability.release(session_id, user_id)
        self._availability.withdraw(user_id)
        with db.atomic():
            User.delete().where(User.id == user_id).execute()
        for session_id in owned:
            self._availability.session_ended(session_id)
        resp.status = falcon.HTTP_204


class JobsResource:
    """``POST /v1/users/me/jobs``: how many jobs the caller's peer is looking for."""

    def __init__(self, settings: Settings, availability: Availability) -> None:
        self._settings = settings
        self._availability = availability

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = read_json(req, schemas.SET_JOBS, max_bytes=self._settings.max_body_bytes, optional=True)
        user = _me(req)
        user.jobs = int(body.get("jobs", 1))
        if "runtime" in body:
            user.runtime = json.dumps(body["runtime"], sort_keys=True)
        with db.atomic():
            user.save()
        self._availability.announce(user)
        resp.media = {"jobs": user.jobs}


class HeartbeatResource:
    """``POST /v1/users/me/heartbeat``: the caller's peer is alive at its address.

    Re-announces everything the registry needs, so a peer reappears by itself after
    Redis lost its data.
    """

    def __init__(self, availability: Availability) -> None:
        self._availability = availability

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        self._availability.announce(_me(req))
        resp.status = falcon.HTTP_204
