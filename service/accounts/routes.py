"""``/api/accounts``: import auth.json files, list, pause, resume, delete.

An import is all or nothing: every file is read and checked first, and one bad file fails the
request (400, naming it) before anything is written; then one Lua script creates, updates or
skips each identity atomically. ``import_without_overwrite`` comes from the live settings
copy, so flipping it applies to the very next import on every replica.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import Response

from service.accounts import authjson
from service.accounts.authjson import AuthJsonDocument, AuthJsonError, ParsedAuth
from service.accounts.domain import AccountState, HotState, parse_account, status
from service.accounts.hot import HotStore, read_state
from service.accounts.schemas import AccountList, AccountView, ImportResult, ImportResults
from service.accounts.store import AccountStore, NewAccount
from service.accounts.tokens import Tokens, seal
from service.core.bodies import (
    drain_empty_body,
    is_json_content_type,
    json_response,
    read_body,
    rfc3339,
)
from service.core.endpoints import Endpoint
from service.core.errors import (
    InvalidAuthJson,
    NotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from service.core.secret_box import SecretBox
from service.settings.live import LiveSettings

FILE_LIMIT = 1024 * 1024
# The whole multipart request: a thousand auth.json files are a few MiB.
REQUEST_LIMIT = 64 * 1024 * 1024
MAX_FILES = 5000
PART_NAME = "auth_json"


def _time(epoch: float | None) -> str | None:
    return None if epoch is None else rfc3339(epoch)


def view(a: AccountState, hot: HotState, now: float) -> AccountView:
    return AccountView(
        id=a.id,
        chatgpt_account_id=a.chatgpt_account_id,
        email=a.email,
        plan_type=a.plan_type,
        status=status(a, hot, now),
        primary_used_percent=hot.usage.primary_used_percent,
        primary_reset_at=_time(hot.usage.primary_reset_at),
        secondary_used_percent=hot.usage.secondary_used_percent,
        secondary_reset_at=_time(hot.usage.secondary_reset_at),
        last_used_at=_time(hot.last_used_at or None),
    )


# --- reading the request ----------------------------------------------------------------------


async def _capped(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"Request body is over {limit // (1024 * 1024)} MiB")
        yield chunk


async def _documents(request: Request) -> list[tuple[str, bytes]]:
    """(filename, content) of every auth.json in the request."""
    content_type = request.headers.get("content-type", "")
    if is_json_content_type(content_type):
        try:
            body = await read_body(request, FILE_LIMIT)
        except PayloadTooLarge:
            raise PayloadTooLarge("auth.json is over 1 MiB") from None
        return [("auth.json", body)]
    if not content_type.lower().startswith("multipart/form-data"):
        raise UnsupportedMediaType("Send auth.json files as multipart/form-data or one as JSON")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > REQUEST_LIMIT:
        raise PayloadTooLarge()
    parser = MultiPartParser(
        request.headers,
        _capped(request, REQUEST_LIMIT),
        max_files=MAX_FILES,
        max_fields=MAX_FILES,
        max_part_size=FILE_LIMIT,
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        # A plain (non-file) part over ``max_part_size``: too large, like an oversize file.
        if "exceeded maximum size" in exc.message:
            raise PayloadTooLarge("A form field is over 1 MiB") from None
        raise InvalidAuthJson(f"Unreadable multipart body: {exc.message}") from None
    documents = []
    try:
        for index, (name, value) in enumerate(form.multi_items()):
            label = value.filename if isinstance(value, UploadFile) else None
            label = label or f"{name}[{index}]"
            if name != PART_NAME:
                raise InvalidAuthJson(f"{label}: unexpected part {name!r}; send {PART_NAME!r}")
            if isinstance(value, UploadFile):
                if value.size is not None and value.size > FILE_LIMIT:
                    raise PayloadTooLarge(f"{label} is over 1 MiB")
                content = await value.read(FILE_LIMIT + 1)
                if len(content) > FILE_LIMIT:
                    raise PayloadTooLarge(f"{label} is over 1 MiB")
            else:
                content = value.encode()
            documents.append((label, content))
    finally:
        await form.close()
    if not documents:
        raise InvalidAuthJson(f"No {PART_NAME!r} file in the request")
    return documents


def _parse_all(documents: list[tuple[str, bytes]]) -> list[ParsedAuth]:
    parsed = []
    for filename, content in documents:
        try:
            parsed.append(authjson.parse(content))
        except AuthJsonError as exc:
            raise InvalidAuthJson(f"{filename}: {exc}") from None
    return parsed


# --- routes -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AccountRoutes:
    store: AccountStore
    hot: HotStore
    box: SecretBox
    settings: LiveSettings

    async def import_accounts(self, request: Request) -> Response:
        documents = await _documents(request)
        parsed = _parse_all(documents)
        overwrite = not self.settings.get().import_without_overwrite
        new = [
            NewAccount(
                id=p.account_key,
                chatgpt_account_id=p.chatgpt_account_id,
                email=p.email,
                plan_type=p.plan_type or "",
                sealed_tokens=seal(
                    self.box,
                    Tokens(
                        access_token=p.access_token,
                        refresh_token=p.refresh_token,
                        id_token=p.id_token,
                        access_expires_at=p.access_expires_at,
                    ),
                ),
            )
            for p in parsed
        ]
        now = time.time()
        statuses = await self.store.import_accounts(new, overwrite=overwrite, now=now)
        rows = await self.store.get_many([a.id for a in new])
        # Just written, so well-formed.
        stored = {a.id: a for a in map(AccountState.from_fields, rows)}
        # Only the imported accounts' state: an import never reads the whole pool.
        states = await self.hot.get_many([a.id for a in new])
        results = [
            ImportResult(
                filename=filename,
                status=outcome,
                account=view(stored[a.id], read_state(a.id, states.get(a.id, {})), now),
            )
            for (filename, _), a, outcome in zip(documents, new, statuses, strict=True)
        ]
        return json_response(ImportResults(results=results))

    async def list_accounts(self, request: Request) -> Response:
        _, _, rows = await self.store.snapshot()
        states = await self.hot.snapshot()
        parsed = (parse_account(i, fields) for i, fields in rows.items())
        accounts = sorted((a for a in parsed if a), key=lambda a: (a.created_at, a.id))
        now = time.time()
        views = [view(a, read_state(a.id, states.get(a.id, {})), now) for a in accounts]
        return json_response(AccountList(accounts=views))

    async def _set_status(
        self, request: Request, status: str, only_if: tuple[str, str] | None
    ) -> Response:
        await drain_empty_body(request)
        account_id = request.path_params["account_id"]
        if await self.store.update(account_id, {"status": status}, only_if=only_if) < 0:
            raise NotFound("No such account")
        account = parse_account(account_id, await self.store.get(account_id))
        if account is None:
            raise NotFound("No such account")
        hot = read_state(account_id, await self.hot.get(account_id))
        return json_response(view(account, hot, time.time()))

    async def pause_account(self, request: Request) -> Response:
        return await self._set_status(request, "paused", None)

    async def resume_account(self, request: Request) -> Response:
        # Only a paused account is resumed; any other status is left as it is.
        return await self._set_status(request, "active", ("status", "paused"))

    async def delete_account(self, request: Request) -> Response:
        await drain_empty_body(request)
        if not await self.store.delete(request.path_params["account_id"]):
            raise NotFound("No such account")
        return Response(status_code=204)


ENDPOINTS = [
    Endpoint(
        "POST",
        "/api/accounts/import",
        AccountRoutes.import_accounts,
        "Import Codex CLI auth.json files (multipart parts named auth_json, or one JSON)",
        "accounts",
        request=AuthJsonDocument,
        upload=PART_NAME,
        response=ImportResults,
        errors=(InvalidAuthJson,),
    ),
    Endpoint(
        "GET",
        "/api/accounts",
        AccountRoutes.list_accounts,
        "List accounts (never a token)",
        "accounts",
        response=AccountList,
    ),
    Endpoint(
        "POST",
        "/api/accounts/{account_id}/pause",
        AccountRoutes.pause_account,
        "Pause an account",
        "accounts",
        response=AccountView,
        errors=(NotFound,),
    ),
    Endpoint(
        "POST",
        "/api/accounts/{account_id}/resume",
        AccountRoutes.resume_account,
        "Resume a paused account",
        "accounts",
        response=AccountView,
        errors=(NotFound,),
    ),
    Endpoint(
        "DELETE",
        "/api/accounts/{account_id}",
        AccountRoutes.delete_account,
        "Delete an account",
        "accounts",
        status=204,
        errors=(NotFound,),
    ),
]
