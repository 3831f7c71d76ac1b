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
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api_keys.live import LiveApiKeys
from service.config import Config
from service.core.errors import InvalidApiKey, NotReady, ServiceError, openai_error_response
from service.core.hub import Hub
from service.core.peers import client_address, direct_loopback, within
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

    def admit(self, conn: HTTPConnection) -> None:
        """Raise unless this request may use the proxy."""
        settings = self.settings.current
        if settings is None or not self.hub.ready or self.hub.draining:
            raise NotReady("codex-lb is not ready to serve requests")
        key = bearer(conn)
        if settings.api_key_auth_enabled:
            if key is None or self.keys.check_key(key) is None:
                raise InvalidApiKey()
            return
        if key is not None and self.keys.check_key(key) is not None:
            return
        trusted = self.config.trusted_proxy_cidrs
        if direct_loopback(conn, trusted):
            return
        ip = client_address(conn, trusted)
        if ip is not None and within(ip, self.config.proxy_unauthenticated_client_cidrs):
            return
        raise InvalidApiKey(KEYLESS_REFUSED)


class ApiKeyGate:
    def __init__(self, app: ASGIApp, *, admission: Admission) -> None:
        self.app = app
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and gated(scope["path"]):
            try:
                self.admission.admit(HTTPConnection(scope))
            except ServiceError as exc:
                await openai_error_response(exc)(scope, receive, send)
                return
        await self.app(scope, receive, send)
