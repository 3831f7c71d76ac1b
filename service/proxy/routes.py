"""Proxy routes that answer from the pool: ``GET /v1/models`` and ``GET /api/codex/usage``."""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass

import httpx
import msgspec
from starlette.requests import Request
from starlette.responses import Response

from service.accounts.domain import (
    ACTIVE,
    PAUSED,
    REAUTH_REQUIRED,
    AccountState,
    HotState,
    Usage,
    status,
)
from service.accounts.hot import LiveAccountStates
from service.accounts.live import LiveAccounts
from service.accounts.tokens import ReauthRequired, RefreshFailed, TokenManager
from service.core.bodies import ResponseBody, json_response
from service.core.endpoints import Endpoint
from service.core.errors import NoAccounts, UpstreamError
from service.proxy.candidates import candidates

# --- /v1/models ---------------------------------------------------------------------------------


class Model(ResponseBody):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "openai"


class ModelList(ResponseBody):
    data: list[Model]
    object: str = "list"


class _UpstreamModel(msgspec.Struct):
    slug: str


class _UpstreamModels(msgspec.Struct):
    models: list[_UpstreamModel]


_models = msgspec.json.Decoder(_UpstreamModels)


# --- /api/codex/usage -----------------------------------------------------------------------------


class UsageWindow(ResponseBody):
    used_percent: float
    limit_window_seconds: int | None
    reset_after_seconds: int | None
    reset_at: int | None


class RateLimit(ResponseBody):
    allowed: bool
    limit_reached: bool
    primary_window: UsageWindow | None
    secondary_window: UsageWindow | None


class Credits(ResponseBody):
    has_credits: bool = False
    unlimited: bool = False
    balance: str = "0"


class PoolUsage(ResponseBody):
    """The upstream ``wham/usage`` shape, for the whole pool."""

    plan_type: str | None
    rate_limit: RateLimit
    credits: Credits


def _window(usages: list[Usage], which: str, now: float) -> UsageWindow | None:
    """Mean used percent over the accounts that reported it; the earliest reset among them."""
    used = [getattr(u, f"{which}_used_percent") for u in usages]
    known = [p for p in used if p is not None]
    if not known:
        return None
    resets = [r for u in usages if (r := getattr(u, f"{which}_reset_at")) is not None]
    sizes = [s for u in usages if (s := getattr(u, f"{which}_window_seconds")) is not None]
    reset_at = min(resets) if resets else None
    return UsageWindow(
        used_percent=round(sum(known) / len(known), 2),
        limit_window_seconds=max(sizes) if sizes else None,
        reset_after_seconds=None if reset_at is None else max(0, int(reset_at - now)),
        reset_at=None if reset_at is None else int(reset_at),
    )


def pool_usage(accounts: list[tuple[AccountState, HotState]], now: float) -> PoolUsage:
    pool = [(a, hot) for a, hot in accounts if a.status not in (PAUSED, REAUTH_REQUIRED)]
    serving = [a for a, hot in pool if status(a, hot, now) == ACTIVE]
    plans = Counter(a.plan_type for a, _ in pool if a.plan_type)
    usages = [hot.usage for _, hot in pool]
    return PoolUsage(
        plan_type=plans.most_common(1)[0][0] if plans else None,
        rate_limit=RateLimit(
            allowed=bool(serving),
            limit_reached=bool(pool) and not serving,
            primary_window=_window(usages, "primary", now),
            secondary_window=_window(usages, "secondary", now),
        ),
        credits=Credits(),
    )


@dataclass(frozen=True)
class ProxyRoutes:
    accounts: LiveAccounts
    states: LiveAccountStates
    tokens: TokenManager
    upstream_base_url: str

    async def _get_with_account(self, path: str) -> httpx.Response:
        """GET an upstream route with one serving account, refreshing its token once on a 401."""
        serving = self.accounts.serving()
        by_id = {a.id: a for a in serving}
        pool = candidates(serving, self.states, time.time())
        eligible = [by_id[c.account_id] for c in pool if c.eligible]
        random.shuffle(eligible)
        url = f"{self.upstream_base_url}{path}"
        for account in eligible:
            try:
                response = await self.tokens.get_as(account, url)
            except (ReauthRequired, RefreshFailed, httpx.HTTPError):
                continue  # try the next account
            if response.status_code == 401 or response.status_code >= 500:
                continue
            return response
        raise NoAccounts()

    async def list_models(self, request: Request) -> Response:
        response = await self._get_with_account("/codex/models")
        if response.status_code != 200:
            raise UpstreamError(f"The upstream answered {response.status_code} for the model list")
        try:
            upstream = _models.decode(response.content)
        except msgspec.DecodeError:
            raise UpstreamError("The upstream's model list was unreadable") from None
        return json_response(ModelList(data=[Model(id=m.slug) for m in upstream.models]))

    async def codex_usage(self, request: Request) -> Response:
        pool = [(a, self.states.get(a.id)) for a in self.accounts.accounts.values()]
        return json_response(pool_usage(pool, time.time()))


ENDPOINTS = [
    Endpoint(
        "GET",
        "/v1/models",
        ProxyRoutes.list_models,
        "Models, through one active account",
        "proxy",
        response=ModelList,
        auth="api_key",
        errors=(UpstreamError, NoAccounts),
    ),
    Endpoint(
        "GET",
        "/api/codex/usage",
        ProxyRoutes.codex_usage,
        "The pool's combined rate-limit windows",
        "proxy",
        response=PoolUsage,
        auth="none",
        store=False,  # answered from this process's live copy of the accounts
    ),
]
