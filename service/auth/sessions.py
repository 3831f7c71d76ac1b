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

from service.clients import scheme
from service.config import Config
from service.records import SessionRecord
from service.redis_store import Store

COOKIE = "dashboard_session"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def cookie_token(conn: HTTPConnection) -> str | None:
    token = conn.cookies.get(COOKIE)
    # Anything that cannot be one of our tokens is not worth a Redis round trip.
    if not token or len(token) > 128:
        return None
    return token


async def resolve(store: Store, config: Config, conn: HTTPConnection) -> SessionRecord | None:
    token = cookie_token(conn)
    if token is None:
        return None
    return await store.touch_session(token_hash(token), config.session_idle_seconds)


async def start(store: Store, config: Config, *, totp_pending: bool) -> str:
    """A new session (never a reused id: rotation at login and after TOTP); returns the token."""
    token = secrets.token_urlsafe(32)
    now = time.time()
    record = SessionRecord(
        created_at=now, expires_at=now + config.session_max_seconds, totp_pending=totp_pending
    )
    ttl = min(config.session_idle_seconds, config.session_max_seconds)
    await store.create_session(token_hash(token), record, ttl)
    return token


async def end(store: Store, conn: HTTPConnection) -> None:
    token = cookie_token(conn)
    if token is not None:
        await store.delete_session(token_hash(token))


def _secure(config: Config, conn: HTTPConnection) -> bool:
    if config.cookie_secure == "auto":
        return scheme(conn, config.trusted_proxy_cidrs) == "https"
    return config.cookie_secure == "true"


def set_cookie(response: Response, token: str, config: Config, conn: HTTPConnection) -> None:
    response.set_cookie(
        COOKIE,
        token,
        max_age=config.session_max_seconds,
        path="/",
        httponly=True,
        samesite="strict",
        secure=_secure(config, conn),
    )


def clear_cookie(response: Response, config: Config, conn: HTTPConnection) -> None:
    response.delete_cookie(
        COOKIE, path="/", httponly=True, samesite="strict", secure=_secure(config, conn)
    )
