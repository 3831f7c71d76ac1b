"""The proxy's fast lane: a streaming proxy request goes from the outermost middleware straight
to its handler (pure ASGI middleware).

Every request on a forwarded route would otherwise cross the dashboard guard, the router, the
route's wrappers and the exception middleware, each adding work on every message it sends; on
the hot path that was a measurable share of the worker's CPU. Here the API-key gate runs first
(the same ``Admission`` as ``ApiKeyGate``), then the handler; its errors get the OpenAI envelope
as anywhere else on a proxy route. Only exact (method, path) pairs marked ``lane`` in the
endpoint table come this way; everything else, including a HEAD or a wrong method on these
paths, goes on to the app as before.
"""

from __future__ import annotations

import logging

from starlette.requests import HTTPConnection, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from service.core.endpoints import Handler
from service.core.errors import ServiceError, openai_error_response
from service.proxy import metrics
from service.proxy.gate import Admission
from service.proxy.trace import TraceSink, close_trace, open_trace

log = logging.getLogger(__name__)


class ProxyLane:
    def __init__(
        self,
        app: ASGIApp,
        *,
        handlers: dict[tuple[str, str], Handler],
        admission: Admission,
        sink: TraceSink,
    ) -> None:
        self.app = app
        self.handlers = handlers
        self.admission = admission
        self.sink = sink

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = (
            self.handlers.get((scope["method"], scope["path"])) if scope["type"] == "http" else None
        )
        if handler is None:
            await self.app(scope, receive, send)
            return
        trace = open_trace(scope["method"], scope["path"])
        try:
            key = self.admission.admit(HTTPConnection(scope))
            if key is not None:
                trace.api_key_id, trace.api_key_name = key.id, key.name
            response = await handler(Request(scope, receive))
        except ServiceError as exc:
            trace.failed(exc.code)
            response = openai_error_response(exc)
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            trace.failed(ServiceError.code)
            response = openai_error_response(ServiceError())
        trace.status = response.status_code
        metrics.request_done(scope["path"], response.status_code)
        try:
            await response(scope, receive, send)
        finally:
            close_trace(trace, self.sink)
