"""``/api/request-logs`` and ``/api/usage/summary`` (CONTRACT §8): what the proxy did, read from
the deployment's shared log and counters, so every replica answers the same."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from service.accounts.live import LiveAccounts
from service.api_keys.store import ApiKeyStore
from service.core.bodies import ResponseBody, json_response, rfc3339
from service.core.endpoints import Endpoint
from service.core.errors import ValidationFailed
from service.ops.request_log import (
    ENTRY_ID_PATTERN,
    WINDOW_HOURS,
    Entry,
    Filter,
    RequestLogStore,
    Totals,
    valid_entry_id,
)

MAX_LIMIT = 500
MAX_ID_LENGTH = 200


class RequestView(ResponseBody):
    id: str
    at: str
    method: str
    path: str
    model: str | None
    stream: bool
    status: int
    error_code: str | None
    api_key_id: str | None
    api_key_name: str | None
    account_id: str | None
    account_email: str | None
    thread_sticky: bool
    attempts: int
    first_event_ms: float | None
    duration_ms: float
    input_tokens: int | None
    cached_input_tokens: int | None
    output_tokens: int | None
    reasoning_tokens: int | None
    request_id: str | None
    upstream_request_id: str | None
    settings_version: int | None


class RequestLogPage(ResponseBody):
    requests: list[RequestView]
    # Pass as ``before`` for the next (older) page; null when there is none.
    next_before: str | None


class KeyUsage(ResponseBody):
    api_key_id: str | None  # null: requests made without an API key
    name: str | None
    requests: int
    errors: int
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int


class AccountUsage(ResponseBody):
    account_id: str
    email: str | None
    requests: int
    errors: int
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int


class UsageSummary(ResponseBody):
    window: str
    api_keys: list[KeyUsage]
    accounts: list[AccountUsage]


def _view(entry_id: str, e: Entry) -> RequestView:
    return RequestView(
        id=entry_id,
        at=rfc3339(e.at),
        method=e.method,
        path=e.path,
        model=e.model,
        stream=e.stream,
        status=e.status,
        error_code=e.error_code,
        api_key_id=e.api_key_id,
        api_key_name=e.api_key_name,
        account_id=e.account_id,
        account_email=e.account_email,
        thread_sticky=e.thread_sticky,
        attempts=e.attempts,
        first_event_ms=e.first_event_ms,
        duration_ms=e.duration_ms,
        input_tokens=e.input_tokens,
        cached_input_tokens=e.cached_input_tokens,
        output_tokens=e.output_tokens,
        reasoning_tokens=e.reasoning_tokens,
        request_id=e.request_id,
        upstream_request_id=e.upstream_request_id,
        settings_version=e.settings_version,
    )


def _invalid(name: str, why: str) -> ValidationFailed:
    return ValidationFailed(f"{name} {why} - at `{name}` (query)")


def _limit(request: Request) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return 50
    try:
        value = int(raw)
    except ValueError:
        raise _invalid("limit", f"must be an integer from 1 to {MAX_LIMIT}") from None
    if not 1 <= value <= MAX_LIMIT:
        raise _invalid("limit", f"must be an integer from 1 to {MAX_LIMIT}")
    return value


def _id(request: Request, name: str) -> str | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    if len(raw) > MAX_ID_LENGTH:
        raise _invalid(name, f"must be at most {MAX_ID_LENGTH} characters")
    return raw


def _status(request: Request) -> int | str | None:
    raw = request.query_params.get("status")
    if raw is None or raw == "":
        return None
    if raw in ("ok", "error"):
        return raw
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 100 <= value <= 599:
        raise _invalid("status", "must be an HTTP status (100-599), 'ok' or 'error'")
    return value


@dataclass(frozen=True)
class UsageRoutes:
    store: RequestLogStore
    api_keys: ApiKeyStore
    accounts: LiveAccounts

    async def request_logs(self, request: Request) -> Response:
        limit = _limit(request)
        before = request.query_params.get("before")
        if before is not None and not valid_entry_id(before):
            raise _invalid("before", "must be an entry id from a previous page")
        where = Filter(
            api_key_id=_id(request, "api_key_id"),
            account_id=_id(request, "account_id"),
            status=_status(request),
        )
        found, next_before = await self.store.page(limit, before, where)
        views = [_view(entry_id, entry) for entry_id, entry in found]
        return json_response(RequestLogPage(requests=views, next_before=next_before))

    async def usage_summary(self, request: Request) -> Response:
        window = request.query_params.get("window", "24h")
        if window not in WINDOW_HOURS:
            raise _invalid("window", "must be one of 24h, 7d")
        summary = await self.store.summary(window)
        names = {r.id: r.name for r in await self.api_keys.records()}
        keys = [
            KeyUsage(api_key_id=key_id, name=names.get(key_id) if key_id else None, **_fields(t))
            for key_id, t in sorted(
                summary.api_keys.items(), key=lambda kv: (-kv[1].requests, kv[0] or "")
            )
        ]
        live = self.accounts.accounts
        accounts = [
            AccountUsage(
                account_id=account_id,
                email=a.email if (a := live.get(account_id)) is not None else None,
                **_fields(t),
            )
            for account_id, t in sorted(
                summary.accounts.items(), key=lambda kv: (-kv[1].requests, kv[0])
            )
        ]
        return json_response(UsageSummary(window=window, api_keys=keys, accounts=accounts))


def _fields(t: Totals) -> dict[str, int]:
    return {
        "requests": t.requests,
        "errors": t.errors,
        "input_tokens": t.input_tokens,
        "cached_input_tokens": t.cached_input_tokens,
        "output_tokens": t.output_tokens,
    }


ENDPOINTS = [
    Endpoint(
        "GET",
        "/api/request-logs",
        UsageRoutes.request_logs,
        "Proxied requests, newest first, paged with before",
        "operations",
        response=RequestLogPage,
        errors=(ValidationFailed,),
        query=(
            ("limit", f"entries per page, 1 to {MAX_LIMIT} (default 50)"),
            ("before", "an id from the previous page's next_before"),
            ("api_key_id", "only requests made with this API key"),
            ("account_id", "only requests served by this account"),
            ("status", "an HTTP status, or ok / error"),
        ),
        query_schema={
            "limit": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT},
            "before": {"type": "string", "pattern": ENTRY_ID_PATTERN},
            "api_key_id": {"type": "string", "maxLength": MAX_ID_LENGTH},
            "account_id": {"type": "string", "maxLength": MAX_ID_LENGTH},
            "status": {
                "anyOf": [
                    {"type": "integer", "minimum": 100, "maximum": 599},
                    {"type": "string", "enum": ["ok", "error"]},
                ]
            },
        },
    ),
    Endpoint(
        "GET",
        "/api/usage/summary",
        UsageRoutes.usage_summary,
        "Requests, errors and tokens per API key and per account",
        "operations",
        response=UsageSummary,
        errors=(ValidationFailed,),
        query=(("window", "24h (default) or 7d"),),
        query_schema={"window": {"type": "string", "enum": list(WINDOW_HOURS)}},
    ),
]
