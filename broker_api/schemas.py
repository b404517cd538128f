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
RUNTIME: Schema = {
    "type": "object",
    "description": (
        "What serialized code needs: Python and dill versions, platform. Strict formats, so"
        " that the matchmaker's runtime buckets stay few."
    ),
    "properties": {
        "python": {
            "type": "string",
            "maxLength": 16,
            "pattern": r"^3\.[0-9]{1,2}(\.[0-9]{1,2}((a|b|rc)[0-9]{1,2})?\+?)?$",
            "description": "Python version, e.g. 3.12 or 3.12.3.",
        },
        "dill": {
            "type": "string",
            "maxLength": 8,
            "pattern": r"^[0-9]\.[0-9]{1,2}(\.[0-9]{1,2})?$",
            "description": "dill version, e.g. 0.3.8.",
        },
        "platform": {
            "type": "string",
            "maxLength": 33,
            "pattern": r"^[a-z0-9]{1,16}(-[A-Za-z0-9_]{1,16})?$",
            "description": "sys.platform, optionally '-' and the machine, e.g. linux-x86_64.",
        },
    },
    "required": ["python", "dill"],
    "additionalProperties": False,
}
_JOBS: Schema = {"type": "integer", "minimum": 0, "maximum": 1024}

_CHALLENGE: Schema = {
    "type": "string",
    "pattern": "^[A-Za-z0-9_-]{43}$",
    "description": "A challenge from POST /v1/challenges (single use, short-lived).",
}


def _signature(signer: str, purpose: str, subject: str) -> Schema:
    return {
        "type": "string",
        "minLength": 1,
        "maxLength": 256,
        "pattern": "^[A-Za-z0-9+/]+={0,2}$",
        "description": (
            f"Base64 signature by {signer} over the UTF-8 bytes"
            f" 'compute-broker/v1\\n{purpose}\\n<challenge>\\n<{subject}>'"
            " (Ed25519, or ECDSA with SHA-256, DER-encoded)."
        ),
    }


CREATE_USER: Schema = {
    "type": "object",
    "properties": {
        "email": _EMAIL,
        "password": _PASSWORD,
        "pubKey": _PUB_KEY,
        "address": _ADDRESS,
        "challenge": _CHALLENGE,
        "signature": _signature("the private key of pubKey", "register", "email, lower-cased"),
    },
    "required": ["email", "password", "pubKey", "address", "challenge", "signature"],
    "additionalProperties": False,
}
_CURRENT_PASSWORD: Schema = {"type": "string", "minLength": 1, "maxLength": 1024}
LOGIN: Schema = {
    "type": "object",
    "description": "Either password, or challenge and signature (key log-in, never throttled).",
    "properties": {
        "email": _EMAIL,
        "password": _CURRENT_PASSWORD,
        "challenge": _CHALLENGE,
        "signature": _signature("the account's registered key", "login", "email, lower-cased"),
    },
    "required": ["email"],
    "additionalProperties": False,
    "dependentRequired": {"challenge": ["signature"], "signature": ["challenge"]},
}
UPDATE_USER: Schema = {
    "type": "object",
    "description": (
        "Changing pubKey, address or password needs proof: currentPassword, or challenge and"
        " currentSignature. A new pubKey also needs challenge and signature by its own key."
    ),
    "properties": {
        "pubKey": _PUB_KEY,
        "address": _ADDRESS,
        "password": _PASSWORD,
        "currentPassword": _CURRENT_PASSWORD,
        "challenge": _CHALLENGE,
        "currentSignature": _signature("the account's registered key", "update", "account id"),
        "signature": _signature("the private key of the new pubKey", "set-key", "account id"),
    },
    "additionalProperties": False,
    "minProperties": 1,
    "dependentRequired": {"signature": ["challenge"], "currentSignature": ["challenge"]},
}
CHALLENGE: Schema = {
    "type": "object",
    "properties": {"challenge": {"type": "string"}, "expiresAt": {"type": "integer"}},
    "required": ["challenge", "expiresAt"],
    "additionalProperties": False,
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
ADDRESS_PROOF: Schema = {
    "type": "object",
    "description": (
        "Whether the broker has proven the address: it connected there and the host signed a"
        " fresh challenge with the registered key. Only a proven host is matched; a new address"
        " or key is probed once, a failed probe again when the host sets its jobs."
    ),
    "properties": {
        "state": {"enum": ["unproven", "probing", "proven", "failed", "limited"]},
        "detail": {"type": "string", "description": "Why a probe failed or was deferred."},
        "checkedAt": {"type": "number", "description": "When the last probe began or ended."},
    },
    "required": ["state", "detail"],
    "additionalProperties": False,
}
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
        "addressProof": ADDRESS_PROOF,
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
