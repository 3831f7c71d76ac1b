"""``create_app(config)``: the one place where the parts of a process are made and wired.

Everything is made here, once, and each part gets what it uses: stores get the connection,
live copies their store, the hub its copies, each feature's routes object its stores and
copies, the two gates their live copies. Nothing is looked up at request time. The lifespan
only starts and stops the background work (the hub's loops, the usage poller).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp

from service.accounts import routes as account_routes
from service.accounts.hot import HotStore, LiveAccountStates
from service.accounts.live import LiveAccounts
from service.accounts.poller import UsagePoller
from service.accounts.store import AccountStore
from service.accounts.tokens import TokenManager
from service.api_keys import routes as api_key_routes
from service.api_keys.live import LiveApiKeys
from service.api_keys.store import ApiKeyStore
from service.auth import routes as auth_routes
from service.auth.credentials import Credentials
from service.auth.guard import DashboardGuard
from service.auth.sessions import Sessions
from service.auth.store import AuthStore
from service.config import Config
from service.core.connection import Connection, connect
from service.core.control_client import make_client
from service.core.endpoints import Endpoint, build_routes, lane_handlers
from service.core.errors import MethodNotAllowed, NotFound, ServiceError, error_response
from service.core.hub import Hub
from service.core.leases import Leases
from service.core.request_ids import RequestIds
from service.core.secret_box import EncryptionKeyError, SecretBox, load_key
from service.core.tasks import cancel_and_wait
from service.core.workers import WorkerRegistry
from service.ops import health, metrics, openapi, usage_routes
from service.ops.log_writer import RequestLogWriter
from service.ops.request_log import RequestLogStore
from service.proxy import routes as proxy_routes
from service.proxy.candidates import PoolView
from service.proxy.gate import Admission, ApiKeyGate
from service.proxy.lane import ProxyLane
from service.proxy.learning import Learner
from service.proxy.relay import Relay
from service.proxy.reservations import Reservations
from service.proxy.routing_state import RoutingState
from service.proxy.trace import current_trace
from service.proxy.units import UnitSteps
from service.settings import routes as settings_routes
from service.settings.live import LiveSettings
from service.settings.store import SettingsStore
from service.ui import routes as ui_routes

log = logging.getLogger(__name__)

# How long shutdown gives the poller, the learner and the request-log writer to stop.
BACKGROUND_STOP_SECONDS = 5.0
# How long shutdown waits for token refreshes under way to store their result.
TOKEN_DRAIN_SECONDS = 15.0
# How long shutdown waits to share what traffic taught (usage, cooldowns, pins).
LEARN_DRAIN_SECONDS = 3.0
# How long shutdown waits to write the request log's last entries.
REQUEST_LOG_DRAIN_SECONDS = 3.0


def endpoints() -> list[Endpoint]:
    """Every route of the service, described; bound to its routes object by ``create_app``."""
    return [
        *health.ENDPOINTS,
        *auth_routes.ENDPOINTS,
        *settings_routes.ENDPOINTS,
        *api_key_routes.ENDPOINTS,
        *account_routes.ENDPOINTS,
        *proxy_routes.ENDPOINTS,
        *usage_routes.ENDPOINTS,
        *metrics.ENDPOINTS,
        *openapi.ENDPOINTS,
    ]


@dataclass(frozen=True)
class Parts:
    """What ``create_app`` made. The server reaches in to start draining and tests to observe;
    handlers never do (each routes object holds only what it uses)."""

    config: Config
    conn: Connection
    box: SecretBox
    http: httpx.AsyncClient
    hub: Hub
    workers: WorkerRegistry
    leases: Leases
    settings_store: SettingsStore
    settings: LiveSettings
    auth_store: AuthStore
    sessions: Sessions
    credentials: Credentials
    api_key_store: ApiKeyStore
    api_keys: LiveApiKeys
    account_store: AccountStore
    accounts: LiveAccounts
    hot_store: HotStore
    account_states: LiveAccountStates
    tokens: TokenManager
    poller: UsagePoller
    routing: RoutingState
    learner: Learner
    relay: Relay
    request_log: RequestLogStore
    log_writer: RequestLogWriter
    # Work that must reach Redis before the process exits (pending request-log entries...),
    # run by the lifespan's shutdown once no request is in flight any more. Each bounds its own
    # time (the whole shutdown must fit in CODEX_LB_DRAIN_SECONDS plus a small margin); one that
    # fails is logged and does not stop the others.
    flush_before_exit: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


async def flush_all(flushes: list[Callable[[], Awaitable[None]]]) -> None:
    for flush in flushes:
        try:
            await flush()
        except Exception:
            log.exception("flush before exit failed: %s", getattr(flush, "__qualname__", flush))


def wire(config: Config, redis_url: str) -> Parts:
    box = SecretBox(load_key(config))
    conn = Connection(connect(redis_url), config.redis_prefix)
    http = make_client()
    workers, leases = WorkerRegistry(conn), Leases(conn)
    settings_store = SettingsStore(conn)
    settings = LiveSettings(settings_store)
    hub = Hub(
        conn, workers, reconcile_seconds=config.settings_reconcile_seconds, report=settings.applied
    )
    settings.on_apply.append(hub.wake)
    auth_store = AuthStore(conn)
    api_key_store = ApiKeyStore(conn)
    account_store = AccountStore(conn)
    accounts = LiveAccounts(account_store)
    hot_store = HotStore(conn)
    tokens = TokenManager(leases, account_store, box, http, config.auth_base_url)
    account_states = LiveAccountStates(hot_store)
    routing = RoutingState(conn)
    steps = UnitSteps()
    learner = Learner(account_states, hot_store, steps)
    relay = Relay(
        config.upstream_base_url,
        accounts,
        PoolView(accounts, account_states, steps),
        settings,
        routing,
        learner,
        tokens,
        box,
        Reservations(conn),
    )
    request_log = RequestLogStore(conn, config.request_log_max)
    parts = Parts(
        request_log=request_log,
        log_writer=RequestLogWriter(request_log, accounts),
        config=config,
        conn=conn,
        box=box,
        http=http,
        hub=hub,
        workers=workers,
        leases=leases,
        settings_store=settings_store,
        settings=settings,
        auth_store=auth_store,
        sessions=Sessions(auth_store, config),
        credentials=Credentials(auth_store, settings_store, box, config.bootstrap_token),
        api_key_store=api_key_store,
        api_keys=LiveApiKeys(api_key_store),
        account_store=account_store,
        accounts=accounts,
        hot_store=hot_store,
        account_states=account_states,
        tokens=tokens,
        poller=UsagePoller(
            leases,
            hot_store,
            accounts,
            tokens,
            http,
            config.upstream_base_url,
            config.usage_poll_seconds,
        ),
        routing=routing,
        learner=learner,
        relay=relay,
    )
    for copy in (parts.settings, parts.api_keys, parts.accounts, parts.account_states):
        hub.register(copy)
    # Every request has ended when these run: their request-log entries go out.
    parts.flush_before_exit.append(lambda: parts.log_writer.stop(REQUEST_LOG_DRAIN_SECONDS))
    return parts


def routes_objects(parts: Parts, table: list[Endpoint]) -> list[object]:
    config = parts.config
    return [
        health.HealthRoutes(parts.hub, parts.settings),
        auth_routes.AuthRoutes(
            parts.auth_store,
            parts.sessions,
            parts.credentials,
            parts.settings_store,
            parts.settings,
            config,
        ),
        settings_routes.SettingsRoutes(parts.settings_store, parts.settings, parts.workers),
        api_key_routes.ApiKeyRoutes(parts.api_key_store),
        account_routes.AccountRoutes(
            parts.account_store, parts.hot_store, parts.box, parts.settings
        ),
        proxy_routes.ProxyRoutes(
            parts.accounts,
            parts.account_states,
            parts.tokens,
            config.upstream_base_url,
            parts.relay,
        ),
        usage_routes.UsageRoutes(parts.request_log, parts.api_key_store, parts.accounts),
        metrics.MetricsRoutes(),
        openapi.OpenApiRoutes(table),
    ]


async def _service_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    trace = current_trace()
    if trace is not None:  # a proxy route off the fast lane
        trace.failed(exc.code)
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


class Service(Starlette):
    """Starlette with the request id outside every layer, Starlette's own error layer included,
    so every response carries ``x-codex-lb-request-id``: a 500 too."""

    def build_middleware_stack(self) -> ASGIApp:
        return RequestIds(super().build_middleware_stack())


def create_app(config: Config) -> Starlette:
    if not config.redis_url:
        raise ValueError("create_app needs CODEX_LB_REDIS_URL (the CLI sets it for embedded Redis)")
    parts = wire(config, config.redis_url)
    hub = parts.hub

    async def first_contact() -> None:
        try:
            await parts.credentials.check_key_fingerprint()
        except EncryptionKeyError as exc:
            # Secrets sealed under another key would not open: refuse to serve at all.
            log.critical("%s", exc)
            hub.draining = True
            os.kill(os.getpid(), signal.SIGTERM)
            return
        await parts.credentials.ensure_bootstrap_token()

    hub.on_first_contact.append(first_contact)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await parts.relay.start()
        await hub.start()
        polling = asyncio.create_task(parts.poller.run(), name="usage-poller")
        learning = asyncio.create_task(parts.learner.run(), name="learner")
        logging_requests = asyncio.create_task(parts.log_writer.run(), name="request-log")
        try:
            yield
        finally:
            # Reached once no request is in flight (the server drained them, or cancelled what
            # outlived CODEX_LB_DRAIN_SECONDS).
            hub.draining = True
            await cancel_and_wait([polling, learning, logging_requests], BACKGROUND_STOP_SECONDS)
            await parts.poller.stop()
            # Serving nothing any more: leave pub/sub and the worker registry now, so the
            # propagation view and PUT ?wait=true stop counting this process.
            await hub.stop()
            # What traffic taught, new thread pins, and whatever else is pending still reach
            # Redis for the others.
            await parts.learner.stop(LEARN_DRAIN_SECONDS)
            await parts.routing.drain(LEARN_DRAIN_SECONDS)
            await flush_all(parts.flush_before_exit)
            await parts.relay.close()
            # A refresh whose caller was cancelled still stores its tokens before the client
            # and Redis connection close (the old refresh token is spent).
            await parts.tokens.drain(TOKEN_DRAIN_SECONDS)
            await parts.http.aclose()
            await parts.conn.close()

    table = endpoints()
    owners = routes_objects(parts, table)
    admission = Admission(hub, parts.settings, parts.api_keys, config)
    app = Service(
        # The dashboard's page and files: not API routes, so not in the table (ui.routes).
        routes=[*build_routes(table, owners), *ui_routes.UiRoutes().routes()],
        middleware=[
            Middleware(
                ProxyLane,
                handlers=lane_handlers(table, owners),
                admission=admission,
                sink=parts.log_writer,
            ),
            Middleware(
                DashboardGuard,
                sessions=parts.sessions,
                trusted_proxies=config.trusted_proxy_cidrs,
            ),
            Middleware(ApiKeyGate, admission=admission, sink=parts.log_writer),
        ],
        exception_handlers={
            ServiceError: _service_error,
            HTTPException: _http_error,
            Exception: _unexpected,
        },
        lifespan=lifespan,
    )
    app.state.parts = parts
    return app


def create_app_from_env() -> Starlette:
    """Factory for uvicorn worker processes."""
    return create_app(Config.from_env())
