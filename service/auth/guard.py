"""The dashboard gate, by path, in front of every route (pure ASGI middleware).

For ``/api/*``: refuses cross-origin writes (403), requires a full session everywhere except
the login routes and the usage route (401), and marks responses ``Cache-Control: no-store``.
A Redis failure while checking a session denies (503): an error never grants access.
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.auth.sessions import Sessions
from service.config import Network
from service.core.errors import (
    CsrfRejected,
    ServiceError,
    TotpRequired,
    Unauthorized,
    dashboard_error_response,
)
from service.core.peers import own_origin

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
PUBLIC_PREFIXES = ("/api/dashboard-auth/", "/api/codex/usage")


# Which requests the guard judges, by path and method; /openapi.json documents the 401, 403 and
# 503 answers from these same two functions, so the document cannot drift from the guard.
def checks_origin(method: str, path: str) -> bool:
    return path.startswith("/api/") and method.upper() not in SAFE_METHODS


def requires_session(path: str) -> bool:
    return path.startswith("/api/") and not path.startswith(PUBLIC_PREFIXES)


class DashboardGuard:
    def __init__(
        self, app: ASGIApp, *, sessions: Sessions, trusted_proxies: tuple[Network, ...]
    ) -> None:
        self.app = app
        self.sessions = sessions
        self.trusted_proxies = trusted_proxies

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/api/"):
            await self.app(scope, receive, send)
            return

        async def send_no_store(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["Cache-Control"] = "no-store"
            await send(message)

        conn = HTTPConnection(scope)
        try:
            if checks_origin(scope["method"], scope["path"]):
                self._check_origin(conn)
            if requires_session(scope["path"]):
                session = await self.sessions.resolve(conn)
                if session is None:
                    raise Unauthorized()
                if session.totp_pending:
                    raise TotpRequired()
        except ServiceError as exc:
            await dashboard_error_response(exc)(scope, receive, send)
            return
        await self.app(scope, receive, send_no_store)

    def _check_origin(self, conn: HTTPConnection) -> None:
        if conn.headers.get("sec-fetch-site") == "cross-site":
            raise CsrfRejected()
        origin = conn.headers.get("origin")
        if origin is not None and origin.lower() != own_origin(conn, self.trusted_proxies):
            raise CsrfRejected()
