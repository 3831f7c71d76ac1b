"""What one proxied request did, gathered on its way for the request log (CONTRACT §8).

The middleware that admits a proxy request opens its ``Trace`` and hands it, once the response
has ended, to a ``TraceSink`` (the batched request-log writer; it never waits on Redis). On the
way the handler, the relay and the stream filter each fill in what they alone know: the model,
the account and attempts, the first event, the token counts. They find the trace through a
context variable, so nothing between them has to carry it. Only what describes the request is
kept: never a prompt, an output, a token, a key or a cookie.
"""

from __future__ import annotations

import contextvars
import time
from typing import Protocol

import msgspec

from service.core.request_ids import current_request_id
from service.proxy.token_usage import TokenUsage


class Record(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What a proxied request did, field by field: what the trace gathers and, with what the
    request log adds, what it stores (``ops.request_log.Entry``)."""

    at: float  # wall clock, when the request arrived
    method: str
    path: str
    status: int = 0
    model: str | None = None
    stream: bool = False
    error_code: str | None = None
    api_key_id: str | None = None
    api_key_name: str | None = None
    account_id: str | None = None
    thread_sticky: bool = False
    attempts: int = 0
    first_event_ms: float | None = None
    duration_ms: float = 0.0
    input_tokens: int | None = None
    cached_input_tokens: int | None = None
    output_tokens: int | None = None
    reasoning_tokens: int | None = None
    request_id: str | None = None
    upstream_request_id: str | None = None
    # The settings version the request was routed by (how fast a change reached traffic).
    settings_version: int | None = None


class Trace(Record, kw_only=True):
    started: float  # monotonic, when the request arrived

    def first_event(self) -> None:
        if self.first_event_ms is None:
            self.first_event_ms = (time.monotonic() - self.started) * 1000

    def failed(self, code: str) -> None:
        """The answer broke or was an error of ours; the first cause is kept."""
        if self.error_code is None:
            self.error_code = code

    def usage(self, usage: TokenUsage) -> None:
        self.input_tokens = usage.input_tokens
        self.output_tokens = usage.output_tokens
        self.cached_input_tokens = usage.cached_tokens
        self.reasoning_tokens = usage.reasoning_tokens

    def completed_event(self, data: bytes) -> None:
        """A ``response.completed`` event's data: its usage, when it reads."""
        try:
            usage = _completed.decode(data).response.usage
        except msgspec.DecodeError:
            return
        if usage is not None:
            self.usage(usage)

    def json_body(self, body: bytes) -> None:
        """A non-streamed Responses answer: its usage, when it reads."""
        try:
            usage = _answer.decode(body).usage
        except msgspec.DecodeError:
            return
        if usage is not None:
            self.usage(usage)


class TraceSink(Protocol):
    def record(self, trace: Trace) -> None:
        """Keep ``trace`` (must not block: called on the request's path)."""


def open_trace(method: str, path: str) -> Trace:
    trace = Trace(
        at=time.time(),
        method=method,
        path=path,
        started=time.monotonic(),
        request_id=current_request_id(),
    )
    _current.set(trace)
    return trace


def close_trace(trace: Trace, sink: TraceSink) -> None:
    trace.duration_ms = (time.monotonic() - trace.started) * 1000
    sink.record(trace)


def current_trace() -> Trace | None:
    """The trace of the proxy request being handled, if any (tests call handlers bare)."""
    return _current.get()


_current: contextvars.ContextVar[Trace | None] = contextvars.ContextVar(
    "codex_lb_trace", default=None
)


class _Response(msgspec.Struct):
    usage: TokenUsage | None = None


class _Completed(msgspec.Struct):
    response: _Response


# Lenient: anything unexpected in the upstream's answer means "no counts", not an error.
_completed = msgspec.json.Decoder(_Completed)
_answer = msgspec.json.Decoder(_Response)
