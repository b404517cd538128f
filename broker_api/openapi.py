"""The OpenAPI 3.1 document of the API, built from the same schemas that validate it.

Because request bodies are validated against ``broker_api.schemas`` and the tests check
every response against this document, the document cannot drift from the code silently.
"""

from __future__ import annotations

from typing import Any

from broker_api import schemas as s

_ERRORS = {
    400: "Malformed JSON or an invalid field (the description names it)",
    401: "Missing, invalid, expired or revoked token",
    403: "Not allowed",
    404: "Absent, or not yours to see",
    409: "Email or pubKey already registered",
    411: "A chunked body that cannot be read here: send Content-Length",
    413: "Body too large",
    415: "Body is not application/json",
    429: "Too many requests (failed logins, challenges, or a per-account cap): see Retry-After",
    503: "A backing service is unreachable",
}

# (method, path, summary, needs token, request schema, body optional, {status: schema})
_OPS: list[tuple[str, str, str, bool, s.Schema | None, bool, dict[int, s.Schema | None]]] = [
    ("post", "/v1/challenges", "A fresh single-use challenge for a key to sign", False, None, False,
     {201: s.CHALLENGE, 429: None}),
    ("post", "/v1/users", "Create an account (pubKey proven by a signed challenge)", False,
     s.CREATE_USER, False, {201: s.USER_WITH_TOKEN, 400: None, 409: None, 411: None, 413: None,
                            415: None}),
    ("post", "/v1/tokens", "Log in by key (signed challenge) or password: a fresh token", False,
     s.LOGIN, False, {201: s.TOKEN, 400: None, 401: None, 411: None, 413: None, 415: None,
                      429: None}),
    ("get", "/v1/users/me", "Own account, with where its address proof stands", True, None, False,
     {200: s.USER, 401: None}),
    ("patch", "/v1/users/me", "Update pubKey, address or password (with proof)", True,
     s.UPDATE_USER, False, {200: s.UPDATED_USER, 400: None, 401: None, 403: None, 409: None,
                            411: None, 413: None, 415: None, 429: None}),
    ("delete", "/v1/users/me", "Delete the account, its sessions and availability", True, None,
     False, {204: None, 401: None}),
    ("post", "/v1/users/me/jobs", "How many jobs I am looking for (0 stops)", True, s.SET_JOBS,
     True, {200: s.JOBS, 400: None, 401: None, 411: None, 413: None, 415: None}),
    ("post", "/v1/users/me/heartbeat", "I am alive at my address", True, None, False,
     {204: None, 401: None}),
    ("post", "/v1/sessions", "Request a pool of workers", True, s.CREATE_SESSION, False,
     {202: s.SESSION, 400: None, 401: None, 411: None, 413: None, 415: None, 429: None}),
    ("get", "/v1/sessions", "Sessions I own or work in", True, None, False,
     {200: s.SESSIONS, 400: None, 401: None}),
    ("get", "/v1/sessions/{sessionId}", "A session; ?wait=S[&since=status] long-polls for a status change",
     True, None, False, {200: s.SESSION, 400: None, 401: None, 404: None, 429: None}),
    ("delete", "/v1/sessions/{sessionId}", "End a session, freeing its workers", True, None,
     False, {204: None, 401: None, 403: None, 404: None}),
    ("delete", "/v1/sessions/{sessionId}/workers/me", "Leave a session", True, None, False,
     {204: None, 401: None, 404: None}),
    ("get", "/v1/health", "API, database and Redis reachable", False, None, False,
     {200: s.HEALTH, 503: s.HEALTH}),
]  # fmt: skip


_PAGE_PARAMS = [
    {"name": "limit", "in": "query", "required": False,
     "description": "Page size (default 50, at most MAX_PAGE_SIZE, 200 by default).",
     "schema": {"type": "integer", "minimum": 1, "maximum": 200}},
    {"name": "cursor", "in": "query", "required": False,
     "description": "The 'next' of the previous page.", "schema": {"type": "string"}},
    {"name": "status", "in": "query", "required": False,
     "description": "Only sessions in these statuses (comma-separated).",
     "schema": {"type": "string"}},
]  # fmt: skip


def build_document() -> dict[str, Any]:
    """Return the OpenAPI 3.1 document as a JSON-ready dict."""
    paths: dict[str, dict[str, Any]] = {}
    for method, path, summary, auth, body, optional, responses in _OPS:
        op: dict[str, Any] = {"summary": summary, "responses": {}}
        if auth:
            op["security"] = [{"bearer": []}]
        params = []
        if "{sessionId}" in path:
            params.append({"name": "sessionId", "in": "path", "required": True, "schema": {"type": "string"}})
        if method == "get" and path == "/v1/sessions/{sessionId}":
            params.append(
                {
                    "name": "wait",
                    "in": "query",
                    "required": False,
                    "description": "Seconds to wait for a status change (capped).",
                    "schema": {"type": "number", "minimum": 0},
                }
            )
            params.append(
                {
                    "name": "since",
                    "in": "query",
                    "required": False,
                    "description": "With wait: the status last seen (default pending); "
                    "returns at once if the session's status differs from it.",
                    "schema": {
                        "type": "string",
                        "enum": ["pending", "matched", "partial", "failed", "closed"],
                    },
                }
            )
        if method == "get" and path == "/v1/sessions":
            params += _PAGE_PARAMS
        if params:
            op["parameters"] = params
        if body is not None:
            op["requestBody"] = {
                "required": not optional,
                "content": {"application/json": {"schema": body}},
            }
        for status, schema in responses.items():
            desc = "Success" if status < 300 else _ERRORS.get(status, "Error")
            if status in (503,) and schema is not None:
                desc = _ERRORS[503]
            entry: dict[str, Any] = {"description": desc}
            if schema is not None or status >= 400:
                entry["content"] = {"application/json": {"schema": schema or s.ERROR}}
            if status == 429:
                entry["headers"] = {
                    "Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}
                }
            op["responses"][str(status)] = entry
        if auth:
            op["responses"].setdefault(
                "401", {"description": _ERRORS[401], "content": {"application/json": {"schema": s.ERROR}}}
            )
        paths.setdefault(path, {})[method] = op
    paths["/openapi.json"] = {
        "get": {
            "summary": "This document",
            "responses": {
                "200": {"description": "OpenAPI 3.1 document", "content": {"application/json": {}}}
            },
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Compute Broker API",
            "version": "1.0.0",
            "description": "Accounts, availability and pool requests for peer-to-peer compute.",
        },
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWE (dir, A256GCM)"}
            }
        },
    }
