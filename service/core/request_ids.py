"""Our own id for each HTTP request: sent back as ``x-codex-lb-request-id`` and put on every
log line written while the request is handled (CONTRACT §8).

The id is random (never derived from what the client sent, so a client cannot forge or collide
with another request's id) and lives in a context variable, so logging and the request-log writer
read it with ``current_request_id()`` without it being passed around. Tasks started while a
request is handled inherit it (asyncio copies the context), which is what a log line of that
work should say.
"""

from __future__ import annotations

import secrets
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "x-codex-lb-request-id"
_HEADER_BYTES = HEADER.encode("latin-1")

_current: ContextVar[str | None] = ContextVar("codex_lb_request_id", default=None)


def new_request_id() -> str:
    """16 hex characters (64 random bits): unique enough to find one request among many."""
    return secrets.token_hex(8)


def current_request_id() -> str | None:
    """The id of the HTTP request being handled in this context, or None outside one."""
    return _current.get()


class RequestIds:
    """Pure ASGI middleware, outermost: gives each HTTP request its id and adds the header to
    its response, whichever layer answers (the proxy lane, a gate, the router, the error
    handler). Plain ASGI because it wraps the proxy's hot path: one extra call per message."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_request_id()
        header = (_HEADER_BYTES, request_id.encode("latin-1"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        token = _current.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _current.reset(token)
