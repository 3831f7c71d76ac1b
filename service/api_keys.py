"""API keys for the proxy routes: create, list, rename, (de)activate, delete; and the check the
proxy gate makes on every request, answered from this process's live copy without Redis.

A key is ``sk-clb-`` + 43 url-safe characters (256 random bits), shown once at creation; only
its SHA-256 is stored. A change reaches every process through pub/sub at once (and through the
reconcile loop within a second if the message is lost); expiry is checked against the clock.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from datetime import UTC, datetime
from typing import Annotated

import msgspec
from msgspec import UNSET, Meta, UnsetType
from starlette.requests import Request
from starlette.responses import Response

from service.errors import NotFound, ValidationFailed
from service.http import drain_empty_body, json_response, read_json
from service.live_collection import Change, Snapshot, VersionedCopy
from service.records import rfc3339
from service.redis_apikeys import ApiKeyRecord, ApiKeyStore, decode_record, message_decoder
from service.routing import Endpoint
from service.schemas import Request as RequestBody
from service.schemas import Response as ResponseBody
from service.state import services

log = logging.getLogger(__name__)

KEY_PREFIX = "sk-clb-"

# Not blank either: ``_name`` checks that, with its own message; the pattern only tells
# /openapi.json.
KeyName = Annotated[str, Meta(min_length=1, max_length=100, extra_json_schema={"pattern": r"\S"})]


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


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _epoch(value: str | None) -> float | None:
    return None if value is None else datetime.fromisoformat(value).timestamp()


class LiveApiKeys(VersionedCopy):
    """This process's copy of the keys, indexed by hash for the per-request check."""

    def __init__(self, store: ApiKeyStore):
        super().__init__(store.channel)
        self.store = store
        self._by_hash: dict[str, tuple[ApiKeyRecord, float | None]] = {}
        self._hash_of: dict[str, str] = {}

    def check_key(self, presented: str, now: float | None = None) -> ApiKeyRecord | None:
        """The live key ``presented`` is, or None (unknown, deactivated, expired)."""
        if not presented.startswith(KEY_PREFIX):
            return None
        entry = self._by_hash.get(key_hash(presented))
        if entry is None:
            return None
        record, expires = entry
        if not record.is_active:
            return None
        if expires is not None and (time.time() if now is None else now) >= expires:
            return None
        return record

    def _put(self, record: ApiKeyRecord) -> None:
        self._drop(record.id)
        self._by_hash[record.key_hash] = (record, _epoch(record.expires_at))
        self._hash_of[record.id] = record.key_hash

    def _drop(self, key_id: str) -> None:
        old = self._hash_of.pop(key_id, None)
        if old is not None:
            self._by_hash.pop(old, None)

    async def _snapshot(self) -> Snapshot:
        stored = await self.store.snapshot()
        records = [r for k, v in stored.records.items() if (r := decode_record(k, v)) is not None]

        def install() -> None:
            self._by_hash, self._hash_of = {}, {}
            for record in records:
                self._put(record)

        return Snapshot(stored.epoch, stored.version, install)

    async def _stored_version(self) -> tuple[str, int]:
        return await self.store.version()

    def _change(self, data: bytes) -> Change:
        message = message_decoder.decode(data)
        key_id = message.id
        record = decode_record(key_id, message.record)
        if record is None:
            # Deleted, or a record we cannot read: either way the key must not work here.
            return Change(message.epoch, message.version, lambda: self._drop(key_id))
        return Change(message.epoch, message.version, lambda: self._put(record))


def _view(record: ApiKeyRecord) -> ApiKeyView:
    return ApiKeyView(
        id=record.id,
        name=record.name,
        key_prefix=record.key_prefix,
        created_at=record.created_at,
        expires_at=record.expires_at,
        is_active=record.is_active,
    )


def _name(value: str) -> str:
    name = value.strip()
    if not name:
        raise ValidationFailed("name must not be blank - at `$.name`")
    return name


async def create_key(store: ApiKeyStore, body: ApiKeyCreate) -> ApiKeyCreated:
    expires_at = None
    if body.expires_at is not None:
        try:
            # Near 9999-12-31 the UTC instant (or a float round trip) can fall past year 9999.
            expires = body.expires_at.astimezone(UTC)
        except OverflowError:
            raise ValidationFailed("expires_at is out of range - at `$.expires_at`") from None
        if expires.timestamp() <= time.time():
            raise ValidationFailed("expires_at must be in the future - at `$.expires_at`")
        expires_at = expires.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    record = ApiKeyRecord(
        id=f"key_{secrets.token_hex(8)}",
        name=_name(body.name),
        key_hash=key_hash(key),
        key_prefix=key[: len(KEY_PREFIX) + 4],
        created_at=rfc3339(time.time()),
        expires_at=expires_at,
        is_active=True,
    )
    await store.create(record)
    view = _view(record)
    return ApiKeyCreated(**{f: getattr(view, f) for f in view.__struct_fields__}, key=key)


# --- routes ---------------------------------------------------------------------------------

_create_decoder = msgspec.json.Decoder(ApiKeyCreate)
_patch_decoder = msgspec.json.Decoder(ApiKeyPatch)


def _store(request: Request) -> ApiKeyStore:
    return services(request).api_keys.store


async def post_key(request: Request) -> Response:
    body = await read_json(request, _create_decoder)
    return json_response(await create_key(_store(request), body), 201)


async def list_keys(request: Request) -> Response:
    records = await _store(request).records()
    records.sort(key=lambda r: (r.created_at, r.id))
    return json_response(ApiKeyList(api_keys=[_view(r) for r in records]))


async def patch_key(request: Request) -> Response:
    body = await read_json(request, _patch_decoder)
    changes: dict[str, object] = {}
    if body.name is not UNSET:
        changes["name"] = _name(body.name)
    if body.is_active is not UNSET:
        changes["is_active"] = body.is_active
    record = await _store(request).patch(request.path_params["key_id"], changes)
    if record is None:
        raise NotFound("No such API key")
    return json_response(_view(record))


async def delete_key(request: Request) -> Response:
    await drain_empty_body(request)
    if not await _store(request).delete(request.path_params["key_id"]):
        raise NotFound("No such API key")
    return Response(status_code=204)


ENDPOINTS = [
    Endpoint(
        "POST",
        "/api/api-keys",
        post_key,
        "Create an API key (shown once)",
        "api-keys",
        request=ApiKeyCreate,
        response=ApiKeyCreated,
        status=201,
    ),
    Endpoint(
        "GET",
        "/api/api-keys",
        list_keys,
        "List API keys (never the key itself)",
        "api-keys",
        response=ApiKeyList,
    ),
    Endpoint(
        "PATCH",
        "/api/api-keys/{key_id}",
        patch_key,
        "Rename or (de)activate a key",
        "api-keys",
        request=ApiKeyPatch,
        response=ApiKeyView,
        errors=(NotFound,),
    ),
    Endpoint(
        "DELETE",
        "/api/api-keys/{key_id}",
        delete_key,
        "Delete a key",
        "api-keys",
        status=204,
        errors=(NotFound,),
    ),
]
