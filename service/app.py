"""``create_app(config)``: the Starlette application with its routes, middleware and lifespan."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response

from service import api_keys, health, openapi, settings
from service.accounts import routes as account_routes
from service.accounts.live import LiveAccounts
from service.accounts.tokens import TokenManager
from service.accounts.usage import UsagePoller
from service.api_keys import LiveApiKeys
from service.auth import routes as auth_routes
from service.auth.credentials import Credentials
from service.auth.guard import DashboardGuard
from service.config import Config
from service.errors import (
    MethodNotAllowed,
    NotFound,
    ServiceError,
    error_response,
)
from service.live import LiveSettings
from service.proxy import routes as proxy_routes
from service.proxy.gate import ApiKeyGate
from service.redis_accounts import AccountStore
from service.redis_apikeys import ApiKeyStore
from service.redis_store import Store, connect
from service.routing import Endpoint, build_routes
from service.secret_box import KeyError_, SecretBox, load_key
from service.state import Services
from service.upstream import make_client

log = logging.getLogger(__name__)

# How long shutdown waits for token refreshes under way to store their result.
TOKEN_DRAIN_SECONDS = 15.0


def endpoints() -> list[Endpoint]:
    table = [
        *health.ENDPOINTS,
        *auth_routes.ENDPOINTS,
        *settings.ENDPOINTS,
        *api_keys.ENDPOINTS,
        *account_routes.ENDPOINTS,
        *proxy_routes.ENDPOINTS,
    ]
    openapi.endpoint(table)
    return table


async def _service_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    return error_response(request.url.path, exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    mapped: ServiceError
    if exc.status_code == 404:
        mapped = NotFound()
    elif exc.status_code == 405:
        # Starlette's 405 names the route's methods in ``Allow`` (HEAD along with GET); keep
        # them, in an order that does not change from one process to the next.
        allow = (exc.headers or {}).get("Allow", "")
        mapped = MethodNotAllowed(", ".join(sorted(m.strip() for m in allow.split(",") if m)))
    else:
        mapped = ServiceError()
        mapped.status = exc.status_code
    return error_response(request.url.path, mapped)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(request.url.path, ServiceError())


def create_app(config: Config) -> Starlette:
    if not config.redis_url:
        raise ValueError("create_app needs CODEX_LB_REDIS_URL (the CLI sets it for embedded Redis)")
    redis_url = config.redis_url

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        box = SecretBox(load_key(config))
        store = Store(connect(redis_url), config.redis_prefix)
        live = LiveSettings(store, reconcile_seconds=config.settings_reconcile_seconds)
        http = make_client()
        account_store = AccountStore(store)
        svc = Services(
            config=config,
            store=store,
            live=live,
            box=box,
            http=http,
            api_keys=LiveApiKeys(ApiKeyStore(store)),
            account_store=account_store,
            accounts=LiveAccounts(account_store),
            tokens=TokenManager(store, account_store, box, http, config.auth_base_url),
        )
        live.attach(svc.api_keys)
        live.attach(svc.accounts)
        poller = UsagePoller(
            store,
            account_store,
            svc.accounts,
            svc.tokens,
            http,
            config.upstream_base_url,
            config.usage_poll_seconds,
        )
        creds = Credentials(store, box, config.bootstrap_token)

        async def first_contact() -> None:
            try:
                await creds.check_key_fingerprint()
            except KeyError_ as exc:
                # Secrets sealed under another key would not open: refuse to serve at all.
                log.critical("%s", exc)
                svc.draining = True
                os.kill(os.getpid(), signal.SIGTERM)
                return
            await creds.ensure_bootstrap_token()

        live.on_first_contact.append(first_contact)
        app.state.services = svc
        await live.start()
        polling = asyncio.create_task(poller.run(), name="usage-poller")
        try:
            yield
        finally:
            svc.draining = True
            polling.cancel()
            await asyncio.wait([polling], timeout=5)
            await poller.stop()
            # A refresh whose caller was cancelled still stores its tokens before the client
            # and Redis connection close (the old refresh token is spent).
            await svc.tokens.drain(TOKEN_DRAIN_SECONDS)
            await live.stop()
            await http.aclose()
            await store.close()

    return Starlette(
        routes=build_routes(endpoints()),
        middleware=[Middleware(DashboardGuard), Middleware(ApiKeyGate)],
        exception_handlers={
            ServiceError: _service_error,
            HTTPException: _http_error,
            Exception: _unexpected,
        },
        lifespan=lifespan,
    )


def create_app_from_env() -> Starlette:
    """Factory for uvicorn worker processes."""
    return create_app(Config.from_env())
