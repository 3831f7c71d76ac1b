"""Server-side dashboard sessions.

The cookie carries a 256-bit random token; Redis keeps the session under the token's SHA-256,
so neither Redis nor a log ever holds a usable token. Ending a session deletes the record,
which every replica sees on the next request.
"""

from __future__ import annotations

import hashlib
import secrets
import time

from starlette.requests import HTTPConnection
from starlette.responses import Response

from service.auth.store import AuthStore, SessionRecord
from service.config import Config
from service.core.peers import scheme

COOKIE = "dashboard_session"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def cookie_token(conn: HTTPConnection) -> str | None:
    token = conn.cookies.get(COOKIE)
    # Anything that cannot be one of our tokens is not worth a Redis round trip.
    if not token or len(token) > 128:
        return None
    return token


class Sessions:
    def __init__(self, store: AuthStore, config: Config):
        self.store = store
        self.config = config

    async def resolve(self, conn: HTTPConnection) -> SessionRecord | None:
        token = cookie_token(conn)
        if token is None:
            return None
        return await self.touch(token)

    async def touch(self, token: str) -> SessionRecord | None:
        return await self.store.touch_session(token_hash(token), self.config.session_idle_seconds)

    async def start(self, *, totp_pending: bool) -> str:
        """A new session (never a reused id: rotation at login and after TOTP); its token."""
        token = secrets.token_urlsafe(32)
        now = time.time()
        record = SessionRecord(
            created_at=now,
            expires_at=now + self.config.session_max_seconds,
            totp_pending=totp_pending,
        )
        ttl = min(self.config.session_idle_seconds, self.config.session_max_seconds)
        await self.store.create_session(token_hash(token), record, ttl)
        return token

    async def end(self, conn: HTTPConnection) -> None:
        token = cookie_token(conn)
        if token is not None:
            await self.store.delete_session(token_hash(token))

    def _secure(self, conn: HTTPConnection) -> bool:
        if self.config.cookie_secure == "auto":
            return scheme(conn, self.config.trusted_proxy_cidrs) == "https"
        return self.config.cookie_secure == "true"

    def set_cookie(self, response: Response, token: str, conn: HTTPConnection) -> None:
        response.set_cookie(
            COOKIE,
            token,
            max_age=self.config.session_max_seconds,
            path="/",
            httponly=True,
            samesite="strict",
            secure=self._secure(conn),
        )

    def clear_cookie(self, response: Response, conn: HTTPConnection) -> None:
        response.delete_cookie(
            COOKIE, path="/", httponly=True, samesite="strict", secure=self._secure(conn)
        )
