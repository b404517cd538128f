"""Peewee models: accounts, sessions and session members.

All models sit on one ``DatabaseProxy`` bound at start-up from ``DATABASE_URL`` (see
``bind_database``), so the same code runs on SQLite (the default) and PostgreSQL.
Structured fields are JSON text for portability (NOTES: peewee gotchas).
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import peewee
from playhouse.db_url import connect

from broker_api.files import private_file

db = peewee.DatabaseProxy()

#: SQLite pragmas (they cannot go in the URL): WAL for concurrent readers, enforced
#: foreign keys, and a busy timeout so concurrent writers queue instead of failing.
SQLITE_PRAGMAS = {"journal_mode": "wal", "foreign_keys": 1, "busy_timeout": 10000}


def new_id() -> str:
    """A random, unguessable identifier: ids must not reveal what else exists."""
    return uuid.uuid4().hex


def bind_database(url: str) -> peewee.Database:
    """Bind the models to the database at ``url`` without connecting.

    Connections are opened per request or per job, never before gunicorn forks.
    """
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["pragmas"] = SQLITE_PRAGMAS
        path = url.split(":///", 1)[-1]
        if path and path != ":memory:":
            private_file(Path(path))
    else:
        kwargs["autoconnect"] = True
    database = connect(url, **kwargs)
    db.initialize(database)
    return database


class BaseModel(peewee.Model):
    class Meta:
        database = db


class User(BaseModel):
    """An account: a requester, a contributor, or both.

    ``jobs`` is how many slots the account offers as a peer; ``token_version`` is bumped
    on a password change or deletion so that older tokens stop verifying.
    """

    id = peewee.CharField(primary_key=True, max_length=32, default=new_id)
    email = peewee.CharField(max_length=254, unique=True)
    password_hash = peewee.CharField(max_length=255)
    pub_key = peewee.TextField(unique=True)  # canonical PEM: one key, one account
    address = peewee.CharField(max_length=300)
    jobs = peewee.IntegerField(default=0)
    runtime = peewee.TextField(default="{}")
    token_version = peewee.IntegerField(default=1)
    created_at = peewee.DoubleField(default=time.time)

    @property
    def runtime_dict(self) -> dict[str, str]:
        return json.loads(self.runtime or "{}")

    @classmethod
    def by_id(cls, user_id: str) -> User | None:
        """The account with this id, or None: the hottest query (every authenticated
        request needs it on a cache miss, and ``GET /v1/users/me`` always), so its SQL is
        built once per database type; peewee spends more time composing a query than
        SQLite spends running this one."""
        key = type(db.obj).__name__
        sql = _BY_ID_SQL.get(key)
        if sql is None:
            sql, _ = cls.select().where(cls.id == "").sql()
            _BY_ID_SQL[key] = sql
        return next(iter(cls.raw(sql, user_id)), None)


_BY_ID_SQL: dict[str, str] = {}


class Session(BaseModel):
    """A pool request and, once matched, the pool itself.

    ``workers`` is the number of slots asked for; ``deadline`` is when a request still
    short of peers becomes ``partial`` or ``failed``.
    """

    id = peewee.CharField(primary_key=True, max_length=32, default=new_id)
    owner = peewee.ForeignKeyField(User, backref="sessions", on_delete="CASCADE")
    status = peewee.CharField(max_length=16, default="pending", index=True)
    workers = peewee.IntegerField()
    min_workers = peewee.IntegerField()
    timeout = peewee.IntegerField()
    runtime = peewee.TextField(default="{}")
    created_at = peewee.DoubleField(default=time.time)
    updated_at = peewee.DoubleField(default=time.time)
    deadline = peewee.DoubleField()

    @property
    def runtime_dict(self) -> dict[str, str]:
        return json.loads(self.runtime or "{}")


class Member(BaseModel):
    """``slots`` of peer ``user`` working in ``session``."""

    session = peewee.ForeignKeyField(Session, backref="members", on_delete="CASCADE")
    user = peewee.ForeignKeyField(User, backref="memberships", on_delete="CASCADE")
    slots = peewee.IntegerField()

    class Meta:
        indexes = ((("session", "user"), True),)


MODELS = [User, Session, Member]


def create_tables() -> None:
    """Create the tables if missing (idempotent; safe from several processes).

    Two PostgreSQL sessions racing on ``CREATE TABLE IF NOT EXISTS`` can still collide
    in the catalog; the loser retries and then finds the tables.
    """
    for attempt in range(3):
        try:
            with db.connection_context():
                db.create_tables(MODELS, safe=True)
            return
        except (peewee.IntegrityError, peewee.ProgrammingError, peewee.OperationalError):
            if attempt == 2:
                raise
            time.sleep(0.2)
