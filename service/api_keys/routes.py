"""``/api/api-keys``: create, list, rename, (de)activate, delete."""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
from msgspec import UNSET
from starlette.requests import Request
from starlette.responses import Response

from service.api_keys.domain import create_key, valid_name, view
from service.api_keys.schemas import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyList,
    ApiKeyPatch,
    ApiKeyView,
)
from service.api_keys.store import ApiKeyStore
from service.core.bodies import drain_empty_body, json_response, read_json
from service.core.endpoints import Endpoint
from service.core.errors import NotFound

_create_decoder = msgspec.json.Decoder(ApiKeyCreate)
_patch_decoder = msgspec.json.Decoder(ApiKeyPatch)


@dataclass(frozen=True)
class ApiKeyRoutes:
    store: ApiKeyStore

    async def post_key(self, request: Request) -> Response:
        body = await read_json(request, _create_decoder)
        return json_response(await create_key(self.store, body), 201)

    async def list_keys(self, request: Request) -> Response:
        records = await self.store.records()
        records.sort(key=lambda r: (r.created_at, r.id))
        return json_response(ApiKeyList(api_keys=[view(r) for r in records]))

    async def patch_key(self, request: Request) -> Response:
        body = await read_json(request, _patch_decoder)
        changes: dict[str, object] = {}
        if body.name is not UNSET:
            changes["name"] = valid_name(body.name)
        if body.is_active is not UNSET:
            changes["is_active"] = body.is_active
        record = await self.store.patch(request.path_params["key_id"], changes)
        if record is None:
            raise NotFound("No such API key")
        return json_response(view(record))

    async def delete_key(self, request: Request) -> Response:
        await drain_empty_body(request)
        if not await self.store.delete(request.path_params["key_id"]):
            raise NotFound("No such API key")
        return Response(status_code=204)


ENDPOINTS = [
    Endpoint(
        "POST",
        "/api/api-keys",
        ApiKeyRoutes.post_key,
        "Create an API key (shown once)",
        "api-keys",
        request=ApiKeyCreate,
        response=ApiKeyCreated,
        status=201,
    ),
    Endpoint(
        "GET",
        "/api/api-keys",
        ApiKeyRoutes.list_keys,
        "List API keys (never the key itself)",
        "api-keys",
        response=ApiKeyList,
    ),
    Endpoint(
        "PATCH",
        "/api/api-keys/{key_id}",
        ApiKeyRoutes.patch_key,
        "Rename or (de)activate a key",
        "api-keys",
        request=ApiKeyPatch,
        response=ApiKeyView,
        errors=(NotFound,),
    ),
    Endpoint(
        "DELETE",
        "/api/api-keys/{key_id}",
        ApiKeyRoutes.delete_key,
        "Delete a key",
        "api-keys",
        status=204,
        errors=(NotFound,),
    ),
]
