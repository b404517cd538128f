"""JSON schemas of request bodies and responses (JSON Schema 2020-12).

Request schemas validate every body before any handler sees it; response schemas are
published in ``/openapi.json`` and the tests check each real response against them.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

_EMAIL: Schema = {
    "type": "string",
    "minLength": 3,
    "maxLength": 254,
    "pattern": r"^[^@\s]+@[^@\s]+$",
}
_PASSWORD: Schema = {"type": "string", "minLength": 8, "maxLength": 1024}
_PUB_KEY: Schema = {
    "type": "string",
    "minLength": 1,
    "maxLength": 8192,
    "description": "PEM-encoded public key (SubjectPublicKeyInfo) of the account's peer.",
}
_ADDRESS: Schema = {
    "type": "string",
    "minLength": 3,
    "maxLength": 300,
    "pattern": r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$",
    "description": "host:port at which the peer accepts work.",
}
_VERSION: Schema = {
    "type": "string",
    "minLength": 1,
    "maxLength": 32,
    "pattern": r"^[0-9]+(\.[0-9A-Za-z]+)*$",
}
RUNTIME: Schema = {
    "type": "object",
    "description": "What serialized code needs: Python and dill versions, platform.",
    "properties": {
        "python": _VERSION,
        "dill": _VERSION,
        "platform": {"type": "string", "minLength": 1, "maxLength": 64},
    },
    "required": ["python", "dill"],
    "additionalProperties": False,
}
_JOBS: Schema = {"type": "integer", "minimum": 0, "maximum": 1024}

CREATE_USER: Schema = {
    "type": "object",
    "properties": {"email": _EMAIL, "password": _PASSWORD, "pubKey": _PUB_KEY, "address": _ADDRESS},
    "required": ["email", "password", "pubKey", "address"],
    "additionalProperties": False,
}
LOGIN: Schema = {
    "type": "object",
    "properties": {"email": _EMAIL, "password": {"type": "string", "minLength": 1, "maxLength": 1024}},
    "required": ["email", "password"],
    "additionalProperties": False,
}
UPDATE_USER: Schema = {
    "type": "object",
    "properties": {
        "pubKey": _PUB_KEY,
        "address": _ADDRESS,
        "password": _PASSWORD,
        "currentPassword": {"type": "string", "minLength": 1, "maxLength": 1024},
    },
    "additionalProperties": False,
    "minProperties": 1,
    "dependentRequired": {"password": ["currentPassword"]},
}
SET_JOBS: Schema = {
    "type": "object",
    "properties": {"jobs": _JOBS, "runtime": RUNTIME},
    "additionalProperties": False,
}
CREATE_SESSION: Schema = {
    "type": "object",
    "properties": {
        "workers": {"type": "integer", "minimum": 1, "maximum": 256},
        "minWorkers": {"type": "integer", "minimum": 1, "maximum": 256},
        "timeout": {"type": "integer", "minimum": 0, "maximum": 3600},
        "runtime": RUNTIME,
    },
    "required": ["workers"],
    "additionalProperties": False,
}

# -- responses ------------------------------------------------------------------

ERROR: Schema = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "description": {"type": "string"}},
    "required": ["title"],
}
_RUNTIME_OUT: Schema = {"type": "object", "additionalProperties": {"type": "string"}}
USER: Schema = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "email": {"type": "string"},
        "pubKey": {"type": "string"},
        "address": {"type": "string"},
        "jobs": {"type": "integer"},
        "runtime": _RUNTIME_OUT,
        "createdAt": {"type": "number"},
    },
    "required": ["id", "email", "pubKey", "address", "jobs", "runtime", "createdAt"],
    "additionalProperties": False,
}
USER_WITH_TOKEN: Schema = {
    "type": "object",
    "properties": {
        **USER["properties"],
        "token": {"type": "string"},
        "expiresAt": {"type": "integer"},
    },
    "required": [*USER["required"], "token", "expiresAt"],
    "additionalProperties": False,
}
UPDATED_USER: Schema = {
    "type": "object",
    "properties": USER_WITH_TOKEN["properties"],
    "required": USER["required"],
    "additionalProperties": False,
    "description": "The account; with a fresh token when the password changed.",
}
TOKEN: Schema = {
    "type": "object",
    "properties": {"token": {"type": "string"}, "expiresAt": {"type": "integer"}},
    "required": ["token", "expiresAt"],
    "additionalProperties": False,
}
JOBS: Schema = {
    "type": "object",
    "properties": {"jobs": {"type": "integer"}},
    "required": ["jobs"],
    "additionalProperties": False,
}
_WORKER: Schema = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "address": {"type": "string"},
        "pubKey": {"type": "string"},
        "slots": {"type": "integer"},
    },
    "required": ["id", "address", "pubKey", "slots"],
    "additionalProperties": False,
}
SESSION: Schema = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "status": {"enum": ["pending", "matched", "partial", "failed", "closed"]},
        "role": {"enum": ["owner", "member"]},
        "requestedWorkers": {"type": "integer"},
        "minWorkers": {"type": "integer"},
        "timeout": {"type": "integer"},
        "runtime": _RUNTIME_OUT,
        "createdAt": {"type": "number"},
        "updatedAt": {"type": "number"},
        "deadline": {"type": "number"},
        "owner": {
            "type": "object",
            "properties": {"id": {"type": "string"}, "pubKey": {"type": "string"}},
            "required": ["id", "pubKey"],
            "additionalProperties": False,
        },
        "workers": {
            "type": "array",
            "items": _WORKER,
            "description": "Matched peers (the owner sees all, a member only itself).",
        },
        "slots": {"type": "integer", "description": "Slots matched in all."},
    },
    "required": [
        "id", "status", "role", "requestedWorkers", "minWorkers", "timeout", "runtime",
        "createdAt", "updatedAt", "deadline", "owner", "workers", "slots",
    ],
    "additionalProperties": False,
}  # fmt: skip
SESSIONS: Schema = {
    "type": "object",
    "properties": {
        "sessions": {"type": "array", "items": SESSION},
        "next": {"type": "string", "description": "cursor of the next page; absent on the last"},
    },
    "required": ["sessions"],
    "additionalProperties": False,
}
HEALTH: Schema = {
    "type": "object",
    "properties": {
        "status": {"enum": ["ok", "unavailable"]},
        "database": {"type": "string"},
        "redis": {"type": "string"},
    },
    "required": ["status", "database", "redis"],
    "additionalProperties": False,
}
