"""Reading request bodies: size cap, content type, JSON syntax, then schema.

Each check fails with the SPEC's status and a description naming the problem, before
any handler sees the data.
"""

from __future__ import annotations

import json
import re
from typing import Any

import falcon
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import ValidationError, best_match

from broker_api.exceptions import InvalidRequest, LengthRequired, PayloadTooLarge, UnsupportedMediaType
from broker_api.schemas import Schema


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Any:
    """``pattern`` as JSON Schema (ECMA-262) means it: Python's ``$`` also matches
    before a final newline, which would let ``"3.12\n"`` or ``"a@b\n"`` through."""
    if not isinstance(instance, str):
        return
    if not re.search(pattern, instance) or (pattern.endswith("$") and instance.endswith("\n")):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


_Strict = validators.extend(Draft202012Validator, {"pattern": _pattern})
_validators: dict[int, Draft202012Validator] = {}


def _validator(schema: Schema) -> Draft202012Validator:
    key = id(schema)
    if key not in _validators:
        Draft202012Validator.check_schema(schema)
        _validators[key] = _Strict(schema)
    return _validators[key]


def _describe(error: ValidationError) -> str:
    where = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        return f"unexpected field(s): {', '.join(extra)}" + (f" in {where}" if where else "")
    if error.validator == "required":
        text = error.message.replace("is a required property", "is required") + (
            f" in {where}" if where else ""
        )
        if text.startswith(("'challenge'", "'signature'")):
            text += (
                ": keys are now proven, not claimed: sign a challenge from POST /v1/challenges"
                " with the key's private key (see /openapi.json)"
            )
        return text
    if error.validator == "dependentRequired":
        return error.message
    if error.validator == "pattern":
        return f"field {where!r} has an invalid format"
    return f"field {where!r}: {error.message}" if where else error.message


def _nul_field(value: Any, where: str = "") -> str | None:
    """The dotted path of the first string (key or value) holding a NUL character.

    Such strings are refused: PostgreSQL cannot store them, and no field needs one.
    """
    if isinstance(value, str):
        return where if "\x00" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{where}.{key}" if where else str(key)
            if "\x00" in key:
                return path
            found = _nul_field(item, path)
            if found is not None:
                return found
    if isinstance(value, list):
        for n, item in enumerate(value):
            found = _nul_field(item, f"{where}.{n}" if where else str(n))
            if found is not None:
                return found
    return None


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _read_unsized(req: falcon.Request, max_bytes: int) -> bytes:
    """The body of a request without Content-Length: empty, or chunked.

    A chunked body is read (at most ``max_bytes + 1`` bytes) only when the server
    decodes chunks and marks the end of the input (``wsgi.input_terminated``, as
    gunicorn does); otherwise it is refused with 411, never taken as empty.
    """
    if not req.get_header("Transfer-Encoding"):
        return b""
    if not req.env.get("wsgi.input_terminated"):
        raise LengthRequired("this server cannot read a chunked body: send Content-Length")
    parts: list[bytes] = []
    left = max_bytes + 1
    while left > 0:
        chunk = req.stream.read(left)
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def read_json(
    req: falcon.Request, schema: Schema, *, max_bytes: int, optional: bool = False
) -> dict[str, Any]:
    """Return the validated JSON object of ``req``'s body.

    Args:
        schema: JSON schema the body must satisfy.
        max_bytes: larger bodies are refused with 413, without reading them whole.
        optional: an empty body is allowed and read as ``{}``.
    """
    length = req.content_length
    if length is not None and length > max_bytes:
        raise PayloadTooLarge(f"request body is {length} bytes; the limit is {max_bytes}")
    raw = req.bounded_stream.read(max_bytes + 1) if length is not None else _read_unsized(req, max_bytes)
    if len(raw) > max_bytes:
        raise PayloadTooLarge(f"request body exceeds the limit of {max_bytes} bytes")
    if not raw:
        if optional:
            return {}
        raise InvalidRequest("a JSON request body is required")
    media = (req.content_type or "").split(";")[0].strip().lower()
    if media != "application/json":
        raise UnsupportedMediaType(f"Content-Type must be application/json, not {media or 'absent'!r}")
    try:
        body = json.loads(raw, parse_constant=_no_constants)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidRequest(f"malformed JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the JSON body must be an object")
    error = best_match(_validator(schema).iter_errors(body))
    if error is not None:
        raise InvalidRequest(_describe(error))
    nul = _nul_field(body)
    if nul is not None:
        raise InvalidRequest(f"field {nul!r} contains a NUL character")
    return body
