"""The API-key gate in front of every proxy route (pure ASGI middleware).

Decided from this process's live copies only (settings and keys): no Redis round trip per
request. With ``api_key_auth_enabled`` on, a live key is required. With it off, keyless use is
allowed only to a socket peer on this machine that is not a trusted proxy, or to a client address
in ``CODEX_LB_PROXY_UNAUTHENTICATED_CLIENT_CIDRS`` (a valid key is accepted from anywhere). A
forwarded address never counts as loopback: a reverse proxy on this machine would otherwise make
every client of it look local (CONTRACT §7). A process that has not loaded its settings, or the
keys when they are needed, serves no proxy traffic at all.
"""

from __future__ import annotations

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api_keys.live import LiveApiKeys
from service.api_keys.store import ApiKeyRecord
from service.config import Config
from service.core.errors import InvalidApiKey, NotReady, ServiceError, openai_error_response
from service.core.hub import Hub
from service.core.peers import client_address, direct_loopback, within
from service.proxy.trace import TraceSink, close_trace, open_trace
from service.settings.live import LiveSettings

GATED_PREFIXES = ("/v1/", "/backend-api/codex/", "/backend-api/transcribe")
KEYLESS_REFUSED = (
    "API key authentication is off, so keyless use is allowed only from this machine or "
    "CODEX_LB_PROXY_UNAUTHENTICATED_CLIENT_CIDRS; create an API key and enable "
    "api_key_auth_enabled to use codex-lb from elsewhere"
)


def gated(path: str) -> bool:
    """Whether the gate judges ``path`` (/openapi.json documents its 401 and 503 from this)."""
    return path.startswith(GATED_PREFIXES)


def bearer(conn: HTTPConnection) -> str | None:
    value = conn.headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


class Admission:
    """Who may use the proxy, decided from this process's live copies."""

    def __init__(self, hub: Hub, settings: LiveSettings, keys: LiveApiKeys, config: Config):
        self.hub = hub
        self.settings = settings
        self.keys = keys
        self.config = config

    def admit(self, conn: HTTPConnection) -> ApiKeyRecord | None:
        """Raise unless this request may use the proxy; the API key it came with, if any."""
        settings = self.settings.current
        if settings is None or not self.hub.ready or self.hub.draining:
            raise NotReady("codex-lb is not ready to serve requests")
        key = bearer(conn)
        if settings.api_key_auth_enabled:
            record = None if key is None else self.keys.check_key(key)
            if record is None:
                raise InvalidApiKey()
            return record
        if key is not None and (record := self.keys.check_key(key)) is not None:
            return record
        trusted = self.config.trusted_proxy_cidrs
        if direct_loopback(conn, trusted):
            return None
        ip = client_address(conn, trusted)
        if ip is not None and within(ip, self.config.proxy_unauthenticated_client_cidrs):
            return None
        raise InvalidApiKey(KEYLESS_REFUSED)


class ApiKeyGate:
    """The gate for the proxy routes off the fast lane (``/v1/models``, and anything else under
    the gated prefixes); each such request is traced for the request log like a lane one."""

    def __init__(self, app: ASGIApp, *, admission: Admission, sink: TraceSink) -> None:
        self.app = app
        self.admission = admission
        self.sink = sink

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not gated(scope["path"]):
            await self.app(scope, receive, send)
            return
        trace = open_trace(scope["method"], scope["path"])
        try:
            try:
                key = self.admission.admit(HTTPConnection(scope))
            except ServiceError as exc:
                trace.failed(exc.code)
                trace.status = exc.status
                await openai_error_response(exc)(scope, receive, send)
                return
            if key is not None:
                trace.api_key_id, trace.api_key_name = key.id, key.name

            async def traced_send(message: Message) -> None:
                if message["type"] == "http.response.start":
                    trace.status = message["status"]
                await send(message)

            await self.app(scope, receive, traced_send)
        finally:
            close_trace(trace, self.sink)
