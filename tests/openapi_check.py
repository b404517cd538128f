"""Checks every response a test receives against the published OpenAPI document.

Wrapping the test client means each test that exercises an endpoint also proves that
``/openapi.json`` tells the truth about it: the status is documented and the body
matches the documented schema.
"""

from __future__ import annotations

import re
from typing import Any

from falcon import testing
from jsonschema import Draft202012Validator

from broker_api.openapi import build_document

_DOC = build_document()
_ROUTES = [(re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", path) + "$"), path) for path in _DOC["paths"]]
checked: set[tuple[str, str, int]] = set()


def check_response(method: str, path: str, status: int, body: Any, raw: bytes) -> None:
    """Assert that (method, path) -> status is documented and ``body`` matches."""
    template = next((t for rx, t in _ROUTES if rx.match(path)), None)
    if template is None or method.lower() not in _DOC["paths"][template]:
        assert status in (404, 405), f"{method} {path} is not documented but answered {status}"
        assert isinstance(body, dict) and "title" in body, raw
        return
    op = _DOC["paths"][template][method.lower()]
    responses = op["responses"]
    assert str(status) in responses, f"{method} {template} answered undocumented {status}: {raw[:300]!r}"
    content = responses[str(status)].get("content")
    if content is None:
        assert raw == b"", f"{method} {template} {status} should have no body"
        return
    schema = content["application/json"].get("schema")
    if schema:
        errors = sorted(Draft202012Validator(schema).iter_errors(body), key=str)
        assert not errors, f"{method} {template} {status} breaks its schema: {errors[0].message}"
    checked.add((method.upper(), template, status))


class ResponseChecker:
    """Delegates to a falcon ``TestClient`` and checks each response."""

    def __init__(self, client: testing.TestClient) -> None:
        self._client = client

    def request(self, method: str, path: str, **kwargs: Any) -> testing.Result:
        result = self._client.simulate_request(method, path, **kwargs)
        try:
            body = result.json if result.content else None
        except ValueError:
            body = None
        assert not (result.status_code >= 500 and result.status_code != 503), result.text
        check_response(method, path, result.status_code, body, result.content)
        return result

    def get(self, path: str, **kw: Any) -> testing.Result:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> testing.Result:
        return self.request("POST", path, **kw)

    def patch(self, path: str, **kw: Any) -> testing.Result:
        return self.request("PATCH", path, **kw)

    def delete(self, path: str, **kw: Any) -> testing.Result:
        return self.request("DELETE", path, **kw)
