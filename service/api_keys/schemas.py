"""Request and response bodies of ``/api/api-keys``."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from msgspec import UNSET, Meta, UnsetType

from service.core.bodies import NOT_BLANK, RequestBody, ResponseBody

# Not blank either: ``valid_name`` checks that, with its own message; the pattern only tells
# /openapi.json.
KeyName = Annotated[
    str, Meta(min_length=1, max_length=100, extra_json_schema={"pattern": NOT_BLANK})
]


class ApiKeyCreate(RequestBody):
    name: KeyName
    expires_at: Annotated[datetime, Meta(tz=True)] | None = None


class ApiKeyPatch(RequestBody):
    name: KeyName | UnsetType = UNSET
    is_active: bool | UnsetType = UNSET


class ApiKeyView(ResponseBody):
    id: str
    name: str
    key_prefix: str
    created_at: str
    expires_at: str | None
    is_active: bool


class ApiKeyCreated(ApiKeyView):
    key: str


class ApiKeyList(ResponseBody):
    api_keys: list[ApiKeyView]
