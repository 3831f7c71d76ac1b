"""The proxy's routes (CONTRACT §7): forwarded to the upstream on a pool account, or answered
from the pool (``/v1/models``, ``/api/codex/usage``).

A forwarded body passes through byte for byte: only ``stream`` and ``prompt_cache_key`` are
read from it, leniently, so new tools and fields reach the upstream as the client sent them.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec
from starlette.requests import Request
from starlette.responses import Response

from service.accounts.hot import LiveAccountStates
from service.accounts.live import LiveAccounts
from service.accounts.tokens import ReauthRequired, RefreshFailed, TokenManager
from service.core.bodies import ResponseBody, json_response, read_body
from service.core.endpoints import Endpoint
from service.core.errors import (
    InvalidJSON,
    NoAccounts,
    PayloadTooLarge,
    UpstreamError,
    UpstreamUnavailable,
    UsageLimitReached,
)
from service.proxy import metrics
from service.proxy.candidates import candidates
from service.proxy.chat import ChatCollector, ChatStream, InvalidChatRequest, chat_request
from service.proxy.pool_usage import PoolUsage, pool_usage
from service.proxy.relay import Answer, Outgoing, Relay
from service.proxy.sse import EventReader
from service.proxy.streaming import Passthrough, Streamed
from service.proxy.trace import Trace, current_trace
from service.proxy.translation import ChatTranslation
from service.proxy.upstream import response_headers

# The largest request body forwarded (a Responses request with images, an audio file).
BODY_LIMIT = 16 * 1024 * 1024


class Model(ResponseBody):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "openai"


class ModelList(ResponseBody):
    data: list[Model]
    object: str = "list"


class _UpstreamModel(msgspec.Struct):
    slug: str


class _UpstreamModels(msgspec.Struct):
    models: list[_UpstreamModel]


_models = msgspec.json.Decoder(_UpstreamModels)


class _Peek(msgspec.Struct):
    """The only fields the proxy reads from a forwarded body; any type is accepted, since the
    upstream, not the proxy, judges the request."""

    stream: Any = None
    prompt_cache_key: Any = None
    model: Any = None


_peek = msgspec.json.Decoder(_Peek)


def _peek_body(body: bytes) -> _Peek:
    try:
        return _peek.decode(body)
    except msgspec.ValidationError:
        raise InvalidJSON("Request body must be a JSON object") from None
    except msgspec.DecodeError:
        raise InvalidJSON() from None


def thread_id(request: Request, prompt_cache_key: object) -> str | None:
    """The conversation a request belongs to: the ``session_id`` header (``session-id``, as
    Codex CLI 0.171 spells it, counts the same), else ``x-session-id``, else the body's
    ``prompt_cache_key`` (which the Codex CLI sets to the same thread id)."""
    headers = request.headers
    found = headers.get("session_id") or headers.get("session-id") or headers.get("x-session-id")
    if found:
        return found
    return prompt_cache_key if isinstance(prompt_cache_key, str) and prompt_cache_key else None


def _upstream_path(request: Request, path: str) -> str:
    # From the scope: building ``request.url`` costs more than the rest of this request's
    # routing.
    query: bytes = request.scope.get("query_string", b"")
    return f"{path}?{query.decode('latin-1')}" if query else path


async def _body(request: Request) -> bytes:
    return await read_body(request, BODY_LIMIT)


def _describe(model: object, stream: bool) -> None:
    """The request's model and mode, for its request-log entry."""
    trace = current_trace()
    if trace is not None:
        trace.model = model[:200] if isinstance(model, str) else None
        trace.stream = stream


@dataclass(frozen=True)
class ProxyRoutes:
    accounts: LiveAccounts
    states: LiveAccountStates
    tokens: TokenManager
    upstream_base_url: str
    relay: Relay

    # --- forwarded ------------------------------------------------------------------------

    def _stream(self, answer: Answer) -> Streamed:
        upstream = answer.response
        sse = upstream.content_type == "text/event-stream"
        account_id = answer.account_id
        headers = response_headers(upstream.headers)
        trace = current_trace()
        json_body = (
            trace.json_body
            if trace is not None and upstream.content_type == "application/json"
            else None
        )
        return Streamed(
            answer,
            headers,
            Passthrough(
                lambda name, data: self._learn(account_id, name, data, trace),
                sse=sse,
                on_json=json_body,
            ),
        )

    async def _forward(self, request: Request, path: str) -> Streamed:
        body = await _body(request)
        peek = _peek_body(body)
        _describe(peek.model, peek.stream is True)
        out = Outgoing(
            "POST",
            _upstream_path(request, path),
            body,
            request.headers.raw,
            thread_id(request, peek.prompt_cache_key),
        )
        return self._stream(await self.relay.open(out))

    async def responses(self, request: Request) -> Response:
        return await self._forward(request, "/codex/responses")

    async def compact(self, request: Request) -> Response:
        return await self._forward(request, "/codex/responses/compact")

    async def codex_models(self, request: Request) -> Response:
        out = Outgoing("GET", _upstream_path(request, "/codex/models"), b"", request.headers.raw)
        return self._stream(await self.relay.open(out))

    async def transcribe(self, request: Request) -> Response:
        body = await _body(request)
        out = Outgoing("POST", _upstream_path(request, "/transcribe"), body, request.headers.raw)
        return self._stream(await self.relay.open(out))

    async def chat_completions(self, request: Request) -> Response:
        chat = chat_request(await _body(request))
        _describe(chat.model, chat.stream)
        headers = [
            (k, v) for k, v in request.headers.raw if k.lower() not in (b"accept", b"content-type")
        ]
        headers += [(b"accept", b"text/event-stream"), (b"content-type", b"application/json")]
        out = Outgoing(
            "POST",
            "/codex/responses",
            chat.upstream_body,
            headers,
            thread_id(request, chat.prompt_cache_key),
        )
        answer = await self.relay.open(out)
        upstream = answer.response
        if upstream.status != 200 or upstream.content_type != "text/event-stream":
            return self._stream(answer)  # the upstream's own error
        account_id = answer.account_id
        trace = current_trace()
        if chat.stream:
            translation = ChatTranslation(
                ChatStream(chat.model, chat.include_usage),
                lambda name, data: self._learn(account_id, name, data, trace),
            )
            headers_out = [
                (k, v) for k, v in response_headers(upstream.headers) if k != b"content-type"
            ]
            headers_out.append((b"content-type", b"text/event-stream; charset=utf-8"))
            return Streamed(answer, headers_out, translation)
        return await self._collect(answer, chat.model)

    def _learn(self, account_id: str, name: str, data: bytes, trace: Trace | None) -> None:
        if name == "codex.rate_limits":
            self.relay.learn_event(account_id, data)
        elif name == "response.completed" and trace is not None:
            trace.completed_event(data)

    async def _collect(self, answer: Answer, model: str) -> Response:
        """A non-streamed chat completion: the upstream's stream gathered into one answer."""
        upstream = answer.response
        collector = ChatCollector(model)
        reader = EventReader()
        trace = current_trace()
        try:
            async for data in upstream.content.iter_any():
                if trace is not None:
                    trace.first_event()
                for name, body in reader.feed(data):
                    self._learn(answer.account_id, name, body, trace)
                    collector.feed(name, body)
            for name, body in reader.close():
                collector.feed(name, body)
        except (TimeoutError, OSError) as exc:
            raise UpstreamError(f"The upstream stream broke off ({type(exc).__name__})") from None
        finally:
            upstream.close()
            metrics.upstream_done(time.perf_counter() - answer.sent_at)
        if collector.failed is not None:
            raise UpstreamError(collector.failed.message)
        headers = {
            k.decode("latin-1"): v.decode("latin-1")
            for k, v in response_headers(upstream.headers)
            if k != b"content-type"
        }
        return Response(collector.result(), 200, headers=headers, media_type="application/json")

    # --- answered from the pool -----------------------------------------------------------

    async def _get_with_account(self, path: str) -> httpx.Response:
        """GET an upstream route with one serving account, refreshing its token once on a 401."""
        serving = self.accounts.serving()
        by_id = {a.id: a for a in serving}
        pool = candidates(serving, self.states, time.time())
        eligible = [by_id[c.account_id] for c in pool if c.eligible]
        random.shuffle(eligible)
        url = f"{self.upstream_base_url}{path}"
        for account in eligible:
            try:
                response = await self.tokens.get_as(account, url)
            except (ReauthRequired, RefreshFailed, httpx.HTTPError):
                continue  # try the next account
            if response.status_code == 401 or response.status_code >= 500:
                continue
            return response
        raise NoAccounts()

    async def list_models(self, request: Request) -> Response:
        response = await self._get_with_account("/codex/models")
        if response.status_code != 200:
            raise UpstreamError(f"The upstream answered {response.status_code} for the model list")
        try:
            upstream = _models.decode(response.content)
        except msgspec.DecodeError:
            raise UpstreamError("The upstream's model list was unreadable") from None
        return json_response(ModelList(data=[Model(id=m.slug) for m in upstream.models]))

    async def codex_usage(self, request: Request) -> Response:
        pool = [(a, self.states.get(a.id)) for a in self.accounts.accounts.values()]
        return json_response(pool_usage(pool, time.time()))


_FORWARD_ERRORS = (
    InvalidJSON,
    PayloadTooLarge,
    NoAccounts,
    UsageLimitReached,
    UpstreamUnavailable,
)


def _forwarded(method: str, path: str, handler: Any, summary: str, **extra: Any) -> Endpoint:
    if method == "POST":
        extra.setdefault("passthrough", "application/json")
    return Endpoint(
        method,
        path,
        handler,
        summary,
        "proxy",
        auth="api_key",
        lane=True,
        errors=extra.pop("errors", _FORWARD_ERRORS),
        store=False,  # routed from the live copies; Redis trouble degrades, never refuses
        **extra,
    )


ENDPOINTS = [
    _forwarded(
        "POST",
        "/backend-api/codex/responses",
        ProxyRoutes.responses,
        "A Responses request, streamed (SSE) or not, on a pool account",
    ),
    _forwarded(
        "POST",
        "/v1/responses",
        ProxyRoutes.responses,
        "A Responses request, streamed (SSE) or not, on a pool account",
    ),
    _forwarded(
        "POST",
        "/backend-api/codex/responses/compact",
        ProxyRoutes.compact,
        "Compact a conversation (JSON) on a pool account",
    ),
    _forwarded(
        "POST",
        "/v1/responses/compact",
        ProxyRoutes.compact,
        "Compact a conversation (JSON) on a pool account",
    ),
    _forwarded(
        "POST",
        "/v1/chat/completions",
        ProxyRoutes.chat_completions,
        "A Chat Completions request, translated to and from Responses",
        errors=(InvalidChatRequest, UpstreamError, *_FORWARD_ERRORS),
    ),
    _forwarded(
        "GET",
        "/backend-api/codex/models",
        ProxyRoutes.codex_models,
        "The upstream's model list, through a pool account",
        errors=(NoAccounts, UsageLimitReached, UpstreamUnavailable),
    ),
    _forwarded(
        "POST",
        "/backend-api/transcribe",
        ProxyRoutes.transcribe,
        "Audio transcription (multipart), passed through to a pool account",
        passthrough="multipart/form-data",
        errors=(PayloadTooLarge, NoAccounts, UsageLimitReached, UpstreamUnavailable),
    ),
    Endpoint(
        "GET",
        "/v1/models",
        ProxyRoutes.list_models,
        "Models, through one active account",
        "proxy",
        response=ModelList,
        auth="api_key",
        errors=(UpstreamError, NoAccounts),
    ),
    Endpoint(
        "GET",
        "/api/codex/usage",
        ProxyRoutes.codex_usage,
        "The pool's combined rate-limit windows",
        "proxy",
        response=PoolUsage,
        auth="none",
        store=False,  # answered from this process's live copy of the accounts
    ),
]
