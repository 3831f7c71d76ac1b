"""Sending an upstream answer on to the client as it arrives.

A plain ASGI response (not Starlette's ``StreamingResponse``: this is the hot path, and it
needs to know when the client leaves). The upstream's chunks go out as they come, through a
``Filter`` (the passthrough, which only taps the events it learns from, or the chat
translation). When the client goes away the upstream response is closed at once, so nothing
keeps running or holding a connection for nobody. When the upstream fails after bytes were
sent, the stream ends with an event saying so (``Filter.failed``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

import aiohttp
import msgspec
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from service.proxy import metrics
from service.proxy.relay import Answer
from service.proxy.sse import EventTap
from service.proxy.trace import Trace, current_trace

log = logging.getLogger(__name__)

# Ends a Responses stream the upstream broke off (the Codex CLI reads it as a failed turn).
TERMINAL_EVENTS = ("response.completed", "response.failed", "response.incomplete")
LEARNED_EVENTS = ("codex.rate_limits", *TERMINAL_EVENTS)


class Filter(Protocol):
    @property
    def finished(self) -> bool:
        """The stream's terminal event has gone by (what is left is its end)."""

    def chunk(self, data: bytes) -> bytes:
        """What the client gets for this upstream chunk."""

    def end(self) -> bytes:
        """What the client gets after the upstream's last chunk."""

    def failed(self, reason: str) -> bytes:
        """What the client gets when the upstream breaks off after bytes were sent."""


# A JSON answer larger than this is passed on without being read for its token counts.
JSON_READ_LIMIT = 1024 * 1024


class Passthrough:
    """The upstream's bytes unchanged; the events we learn from are read on the side, and a
    JSON answer (when ``on_json`` wants it) once it is whole."""

    def __init__(
        self,
        on_event: Callable[[str, bytes], None],
        *,
        sse: bool,
        on_json: Callable[[bytes], None] | None = None,
    ):
        self.tap = EventTap(LEARNED_EVENTS) if sse else None
        self.on_event = on_event
        self.on_json = on_json
        self._json: list[bytes] = []
        self._json_size = 0
        self.finished = not sse  # a JSON body has no terminal event to wait for

    def chunk(self, data: bytes) -> bytes:
        if self.tap is not None:
            for name, body in self.tap.feed(data):
                if name in TERMINAL_EVENTS:
                    self.finished = True
                self.on_event(name, body)
        elif self.on_json is not None and self._json_size <= JSON_READ_LIMIT:
            self._json.append(data)
            self._json_size += len(data)
        return data

    def end(self) -> bytes:
        if self.on_json is not None and self._json and self._json_size <= JSON_READ_LIMIT:
            self.on_json(b"".join(self._json))
        return b"" if self.finished else self.failed("the upstream ended the stream early")

    def failed(self, reason: str) -> bytes:
        if self.finished:
            return b""
        self.finished = True
        event = {
            "type": "response.failed",
            "response": {
                "status": "failed",
                "error": {"code": "upstream_error", "message": reason},
            },
        }
        return b"event: response.failed\ndata: " + msgspec.json.encode(event) + b"\n\n"


async def _client_gone(receive: Receive, upstream: aiohttp.ClientResponse) -> None:
    """Wait for the client to leave, then close the upstream answer (which ends the read)."""
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            upstream.close()
            return


class Streamed(Response):
    """An ASGI response streaming ``answer`` through ``filter``."""

    def __init__(
        self,
        answer: Answer,
        headers: list[tuple[bytes, bytes]],
        filter: Filter,
    ):
        # Not Response.__init__: there is no body to render; only what a route's caller reads.
        self.status_code = answer.response.status
        self.background = None
        self.answer = answer
        self.header_list = headers
        self.filter = filter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        upstream = self.answer.response
        watcher = asyncio.create_task(_client_gone(receive, upstream))
        complete = False
        trace = current_trace()
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": upstream.status,
                    "headers": self.header_list,
                }
            )
            tail = await self._pump(upstream, send, trace)
            if not watcher.done():
                await send({"type": "http.response.body", "body": tail, "more_body": False})
                complete = upstream.content.at_eof()
        except OSError:
            pass  # the client went away while we wrote to it
        finally:
            watcher.cancel()
            if trace is not None and not complete:
                trace.failed("client_disconnected")
            metrics.upstream_done(time.perf_counter() - self.answer.sent_at)
            # A connection whose answer was read to the end goes back to the pool; any other
            # is closed, so no half-read answer is left for the next request to find.
            if complete:
                self.answer.release()
            else:
                upstream.close()

    async def _pump(
        self, upstream: aiohttp.ClientResponse, send: Send, trace: Trace | None
    ) -> bytes:
        """Copy the upstream's chunks; the bytes to end with.

        Once the stream's terminal event has gone by, what follows is held and sent with the
        end of the response in one write: the upstream closes right after that event, so the
        client waits no longer, and the worker saves a write per request."""
        held: list[bytes] = []
        try:
            async for data in upstream.content.iter_any():
                if trace is not None and trace.first_event_ms is None:
                    trace.first_event()
                out = self.filter.chunk(data)
                if self.filter.finished:
                    held.append(out)
                elif out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
        except (aiohttp.ClientError, TimeoutError) as exc:
            reason = (
                "the upstream went silent"
                if isinstance(exc, TimeoutError)
                else "the upstream connection broke"
            )
            if trace is not None:
                trace.failed("upstream_error")
            return b"".join([*held, self.filter.failed(reason)])
        return b"".join([*held, self.filter.end()])
