"""Account resources: sign-up, log-in, own account, jobs wanted, heartbeat."""

from __future__ import annotations

import json
from typing import Any

import falcon
import peewee

from broker_api import schemas
from broker_api.auth import TokenVersions
from broker_api.availability import Availability
from broker_api.bodies import read_json
from broker_api.challenges import Challenges, message, normalize, verify
from broker_api.exceptions import Conflict, Forbidden, InvalidRequest, NotFound, Unauthorized
from broker_api.matching.keys import Status
from broker_api.models import Member, Session, User, db
from broker_api.passwords import DUMMY_HASH, hash_password, verify_password
from broker_api.settings import Settings
from broker_api.throttle import LoginThrottle
from broker_api.tokens import TokenCodec


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


def _client(req: falcon.Request) -> str:
    return req.remote_addr or "unknown"


_STALE_CHALLENGE = (
    "field 'challenge' is unknown, already used or expired; get a fresh one from POST /v1/challenges"
)


class ChallengesResource:
    """``POST /v1/challenges``: a fresh single-use nonce for a key to sign."""

    public = True

    def __init__(self, challenges: Challenges) -> None:
        self._challenges = challenges

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        challenge, expires = self._challenges.issue(_client(req))
        resp.status = falcon.HTTP_201
        resp.media = {"challenge": challenge, "expiresAt": expires}


class UsersResource:
    """``POST /v1/users``: create an account and return it with a first token.

    The body carries a signature by the private key of ``pubKey`` over a fresh
    challenge (purpose ``register``, subject the email): keys are proven, not claimed.
    """

    public = True

    def __init__(self, settings: Settings, codec: TokenCodec, challenges: Challenges) -> None:
        self._settings = settings
        self._codec = codec
        self._challenges = challenges

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = read_json(req, schemas.CREATE_USER, max_bytes=self._settings.max_body_bytes)
        email = _normalize_email(body["email"])
        pub_key = normalize(body["pubKey"])
        address = _check_address(body["address"])
        if not self._challenges.consume(body["challenge"]):
            raise InvalidRequest(_STALE_CHALLENGE)
        if not verify(pub_key, body["signature"], message("register", body["challenge"], email)):
            raise InvalidRequest(
                "field 'signature' is not pubKey's signature over the challenge"
                " (purpose 'register', subject the lower-cased email)"
            )
        if User.select().where(User.email == email).exists():
            raise Conflict(f"an account with email {email!r} already exists")
        if User.select().where(User.pub_key == pub_key).exists():
            raise Conflict("this pubKey is registered to another account")
        password_hash = hash_password(body["password"], n=self._settings.scrypt_n)
        try:
            with db.atomic():
                user = User.create(email=email, password_hash=password_hash, pub_key=pub_key, address=address)
        except peewee.IntegrityError:
            raise Conflict("an account with this email or pubKey already exists") from None
        token, expires = self._codec.issue(user.id, user.token_version)
        resp.status = falcon.HTTP_201
        resp.location = "/v1/users/me"
        resp.media = {**user_view(user), "token": token, "expiresAt": expires}


class TokensResource:
    """``POST /v1/tokens``: log in with the account's key (a signed challenge) or with
    email and password. Only password log-ins pass through the throttle."""

    public = True

    def __init__(
        self, settings: Settings, codec: TokenCodec, throttle: LoginThrottle, challenges: Challenges
    ) -> None:
        self._settings = settings
        self._codec = codec
        self._throttle = throttle
        self._challenges = challenges

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = read_json(req, schemas.LOGIN, max_bytes=self._settings.max_body_bytes)
        email = _normalize_email(body["email"])
        if "password" in body and "challenge" in body:
            raise InvalidRequest("give either password, or challenge and signature, not both")
        if "challenge" in body:
            user = self._by_key(email, body["challenge"], body["signature"])
        elif "password" in body:
            user = self._by_password(email, body["password"], _client(req))
        else:
            raise InvalidRequest("give password, or challenge and signature (log-in by key)")
        token, expires = self._codec.issue(user.id, user.token_version)
        resp.status = falcon.HTTP_201
        resp.media = {"token": token, "expiresAt": expires}

    def _by_key(self, email: str, challenge: str, signature: str) -> User:
        fresh = self._challenges.consume(challenge)
        user = User.get_or_none(User.email == email)
        if (
            not fresh
            or user is None
            or not verify(user.pub_key, signature, message("login", challenge, email))
        ):
            raise Unauthorized("wrong email, key or challenge (challenges are single-use and short-lived)")
        return user

    def _by_password(self, email: str, password: str, client: str) -> User:
        self._throttle.attempt(email, client)
        user = User.get_or_none(User.email == email)
        # Verify against a dummy hash for unknown emails: same cost, no enumeration.
        ok = verify_password(password, user.password_hash if user else DUMMY_HASH)
        if not ok or user is None:
            raise Unauthorized("wrong email or password")
        self._throttle.succeeded(email, client)
        return user


class MeResource:
    """``/v1/users/me``: read, update or delete the caller's account.

    A token alone reads the account; changing its key, address or password needs proof
    too: ``currentPassword`` (throttled like a log-in) or ``currentSignature``, the
    registered key's signature over a fresh challenge. A new key proves itself with
    ``signature`` over the same challenge.
    """

    def __init__(
        self,
        settings: Settings,
        codec: TokenCodec,
        versions: TokenVersions,
        availability: Availability,
        throttle: LoginThrottle,
        challenges: Challenges,
    ) -> None:
        self._settings = settings
        self._codec = codec
        self._versions = versions
        self._availability = availability
        self._throttle = throttle
        self._challenges = challenges

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        user = _me(req)
        proof = self._availability.proof(user)
        view = {"state": proof.state, "detail": proof.detail}
        if proof.checked_at is not None:
            view["checkedAt"] = proof.checked_at
        resp.media = {**user_view(user), "addressProof": view}

    def _prove(self, req: falcon.Request, body: dict[str, Any], user: User) -> None:
        """Check the proof of ownership the body carries; raise unless there is one."""
        proven = False
        if "currentPassword" in body:
            self._throttle.attempt(user.email, _client(req))
            if not verify_password(body["currentPassword"], user.password_hash):
                raise Forbidden("field 'currentPassword' is wrong")
            self._throttle.succeeded(user.email, _client(req))
            proven = True
        if "challenge" in body and not self._challenges.consume(body["challenge"]):
            raise InvalidRequest(_STALE_CHALLENGE)
        if "currentSignature" in body:
            if not verify(
                user.pub_key, body["currentSignature"], message("update", body["challenge"], user.id)
            ):
                raise Forbidden(
                    "field 'currentSignature' is not the registered key's signature over the challenge"
                    " (purpose 'update', subject the account id)"
                )
            proven = True
        if not proven:
            raise InvalidRequest(
                "changing pubKey, address or password needs proof, not only a token: give"
                " currentPassword, or challenge and currentSignature (the registered key's)"
            )

    def on_patch(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = read_json(req, schemas.UPDATE_USER, max_bytes=self._settings.max_body_bytes)
        if not {"pubKey", "address", "password"} & set(body):
            raise InvalidRequest("nothing to update: give pubKey, address or password")
        user = _me(req)
        new_key = normalize(body["pubKey"]) if "pubKey" in body else None
        if new_key is not None and new_key == normalize(user.pub_key):
            new_key = None  # the same key again: nothing to prove for it
        address = _check_address(body["address"]) if "address" in body else None
        if address == user.address:
            address = None
        if new_key is None and address is None and "password" not in body:
            resp.media = user_view(user)  # nothing changes: no proof needed
            return
        if new_key is not None and "signature" not in body:
            raise InvalidRequest(
                "field 'signature' is required with a new pubKey: its key's signature over a"
                " challenge from POST /v1/challenges (purpose 'set-key', subject the account id)"
            )
        self._prove(req, body, user)
        if new_key is not None:
            if not verify(new_key, body["signature"], message("set-key", body["challenge"], user.id)):
                raise InvalidRequest(
                    "field 'signature' is not the new pubKey's signature over the challenge"
                    " (purpose 'set-key', subject the account id)"
                )
            if User.select().where((User.pub_key == new_key) & (User.id != user.id)).exists():
                raise Conflict("this pubKey is registered to another account")
            user.pub_key = new_key
        if address is not None:
            user.address = address
        new_token: dict[str, Any] = {}
        if "password" in body:
            user.password_hash = hash_password(body["password"], n=self._settings.scrypt_n)
            user.token_version += 1
        try:
            with db.atomic():
                user.save()
        except peewee.IntegrityError:
            raise Conflict("this pubKey is registered to another account") from None
        if "password" in body:
            self._versions.set(user.id, user.token_version)
            token, expires = self._codec.issue(user.id, user.token_version)
            new_token = {"token": token, "expiresAt": expires}
        if user.jobs and (new_key is not None or address is not None):
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
        self._availability.announce(user, explicit=True)
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
