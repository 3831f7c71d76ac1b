"""Request and response bodies: the base structs, reading with msgspec, writing JSON.

A body is checked in a fixed order, so every bad request gets the same answer on every route:
content type (415), size (413), JSON syntax (400), shape and types (422).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from service.core.errors import InvalidJSON, PayloadTooLarge, UnsupportedMediaType, ValidationFailed

T = TypeVar("T")


class RequestBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of every request body: strict, unknown fields are a validation error (a typo in a
    setting name must be a 422, never a silently ignored write). Records kept in Redis are
    defined next to their stores and do the opposite (tolerate unknown fields), because old
    and new pods read each other's data during a rolling deploy."""


class ResponseBody(msgspec.Struct, kw_only=True):
    """Base of every response body."""


# A string that is not blank holds one character ``str.strip()`` keeps. ``\S`` is not that: in
# ECMA-262 (the dialect of /openapi.json patterns) U+0085 and U+001C..U+001F are not whitespace,
# while Python strips them, so a client's validator would pass a name the server refuses. The
# class lists exactly the 29 characters for which ``str.isspace()`` is true and reads the same in
# both dialects (tests/test_api_keys.py checks it against every code point).
NOT_BLANK = r"[^\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"

JSON_BODY_LIMIT = 64 * 1024

_encoder = msgspec.json.Encoder()
# msgspec names the path of a wrong value, but for a missing or unknown field only the object;
# add the field's own path so every 422 names `$.field`.
_FIELD_MESSAGE = re.compile(
    r"^Object (missing required|contains unknown) field `([^`]+)`(?: - at `(\$[^`]*)`)?$"
)


def is_json_content_type(value: str | None) -> bool:
    if not value:
        return False
    media = value.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing to buffer more than ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge()
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge()
        chunks.append(chunk)
    return b"".join(chunks)


def _validation_message(exc: msgspec.ValidationError) -> str:
    text = str(exc)
    match = _FIELD_MESSAGE.match(text)
    if match:
        kind, field, parent = match.groups()
        return f"Object {kind} field `{field}` - at `{parent or '$'}.{field}`"
    if " - at `$" not in text:
        return f"{text} - at `$`"
    return text


def decode(raw: bytes, decoder: msgspec.json.Decoder[T]) -> T:
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise ValidationFailed(_validation_message(exc)) from None
    except msgspec.DecodeError:
        raise InvalidJSON() from None


async def read_json(request: Request, decoder: msgspec.json.Decoder[T]) -> T:
    if not is_json_content_type(request.headers.get("content-type")):
        raise UnsupportedMediaType()
    return decode(await read_body(request, JSON_BODY_LIMIT), decoder)


async def drain_empty_body(request: Request) -> None:
    """Routes without a body accept an empty one with any content type; cap what they read."""
    await read_body(request, JSON_BODY_LIMIT)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_encoder.encode(body), status, headers=headers, media_type="application/json")


def rfc3339(epoch: float) -> str:
    """UTC, microsecond precision, ``Z`` suffix: how every time is written in a body."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
