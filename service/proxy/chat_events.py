"""Reading an upstream Responses SSE stream for the Chat Completions translation.

``ResponseReader`` reduces the events to what a chat client can see (text, refusal, tool calls,
the end, a failure) and calls one hook for each; ``chat_stream`` writes chunks from the hooks or
keeps the parts for one ``chat.completion``, so the streamed and the aggregated answers cannot
disagree. What the chat shape has no place for (reasoning, ``codex.rate_limits``, events added
later) is ignored, and so is an event whose data is not the JSON we expect: the upstream's
wording never makes the translation fail.
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass
from typing import Any

import msgspec

from service.proxy.token_usage import TokenUsage

# --- what we read from the upstream (msgspec skips every other field) -------------------------


class _Typed(msgspec.Struct):
    type: str = ""


class _Delta(msgspec.Struct):
    delta: str = ""
    item_id: str | None = None
    output_index: int | None = None


class _Part(msgspec.Struct):
    type: str = ""
    text: str | None = None
    refusal: str | None = None


class _Item(msgspec.Struct):
    type: str = ""
    id: str | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    content: list[_Part] | None = None


class _ItemEvent(msgspec.Struct):
    item: _Item
    output_index: int | None = None


class _Response(msgspec.Struct):
    id: Any = None
    # Any, converted on their own: a usage we cannot read must not cost us the end of the answer.
    usage: Any = None
    incomplete_details: Any = None


class _ResponseEvent(msgspec.Struct):
    response: _Response


_decode_type = msgspec.json.Decoder(_Typed).decode
_decode_delta = msgspec.json.Decoder(_Delta).decode
_decode_item = msgspec.json.Decoder(_ItemEvent).decode
_decode_response = msgspec.json.Decoder(_ResponseEvent).decode

# --- what the chat side is told ---------------------------------------------------------------


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int = 0


class CompletionTokensDetails(msgspec.Struct):
    reasoning_tokens: int = 0


class ChatUsage(msgspec.Struct):
    """Chat Completions ``usage``, as OpenAI writes it."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = msgspec.field(default_factory=PromptTokensDetails)
    completion_tokens_details: CompletionTokensDetails = msgspec.field(
        default_factory=CompletionTokensDetails
    )


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """Why the upstream failed, as it said it (``code`` is ``upstream_error`` when it did not)."""

    message: str
    code: str


NO_MESSAGE = "The upstream failed without saying why"


class ResponseReader:
    """Follows one upstream response and calls a hook for each thing a chat client sees."""

    def __init__(self, chunk_id: str | None) -> None:
        self._id = chunk_id
        self._response_id: str | None = None
        # Tool call index by upstream item id (str) and by output_index (int): a delta names
        # its call by either, and the two key types cannot collide.
        self._call_index: dict[str | int, int] = {}
        self._argued: set[int] = set()  # tool calls whose arguments were sent
        self._texted: set[str | int] = set()  # output items that streamed text
        self._tool_calls = 0
        self._usage: ChatUsage | None = None
        self._failed: ErrorInfo | None = None
        self._finish_reason: str | None = None
        self._closed = False  # nothing more is read: the response ended, or we finished

    @property
    def failed(self) -> ErrorInfo | None:
        return self._failed

    @property
    def complete(self) -> bool:
        """Whether the upstream said the response ended (completed, incomplete or failed);
        False once the events ran out means the upstream stream was cut short."""
        return self._failed is not None or self._finish_reason is not None

    @property
    def usage(self) -> ChatUsage | None:
        return self._usage

    @property
    def response_id(self) -> str | None:
        return self._response_id

    @property
    def id(self) -> str:
        """The chat id: fixed at first use, from the upstream response id when known."""
        if self._id is None:
            rest = (self._response_id or "").removeprefix("resp_") or uuid.uuid4().hex
            self._id = f"chatcmpl-{rest}"
        return self._id

    def _default_finish_reason(self) -> str:
        return "tool_calls" if self._tool_calls else "stop"

    def _read(self, event: str, data: bytes) -> None:
        if self._closed:
            return
        if not event:  # a stream without ``event:`` lines names the type in the data only
            try:
                event = _decode_type(data).type
            except msgspec.DecodeError:
                return
        if event in ("response.failed", "error"):
            self._fail(data)
            return
        try:
            self._dispatch(event, data)
        except msgspec.DecodeError:
            return

    def _dispatch(self, event: str, data: bytes) -> None:
        match event:
            case "response.created":
                response_id = _decode_response(data).response.id
                self._response_id = response_id if isinstance(response_id, str) else None
                self._on_start()
            case "response.output_text.delta" | "response.refusal.delta":
                delta = _decode_delta(data)
                self._texted.update(k for k in (delta.item_id, delta.output_index) if k is not None)
                if delta.delta:
                    self._on_text(delta.delta, refusal=event == "response.refusal.delta")
            case "response.output_item.added":
                added = _decode_item(data)
                if added.item.type == "function_call":
                    self._call(added)
            case "response.function_call_arguments.delta":
                delta = _decode_delta(data)
                index = self._find_call(delta.item_id, delta.output_index)
                if index is not None and delta.delta:
                    self._argued.add(index)
                    self._on_arguments(index, delta.delta)
            case "response.output_item.done":
                self._item_done(_decode_item(data))
            case "response.completed" | "response.incomplete":
                response = _decode_response(data).response
                self._completed(response, incomplete=event == "response.incomplete")

    def _find_call(self, item_id: str | None, output_index: int | None) -> int | None:
        # By item id when the upstream gives one, else by position in the output.
        if item_id is not None and item_id in self._call_index:
            return self._call_index[item_id]
        return None if output_index is None else self._call_index.get(output_index)

    def _call(self, event: _ItemEvent) -> int:
        item = event.item
        index = self._tool_calls
        self._tool_calls += 1
        if item.id:
            self._call_index[item.id] = index
        if event.output_index is not None:
            self._call_index[event.output_index] = index
        call_id = item.call_id or item.id or f"call_{uuid.uuid4().hex}"
        self._on_call(index, call_id, item.name or "")
        return index

    def _item_done(self, event: _ItemEvent) -> None:
        # The arguments or text of an item whose deltas never came arrive whole with its end.
        item, at = event.item, event.output_index
        if item.type == "function_call":
            index = self._find_call(item.id, at)
            if index is None:  # never announced by output_item.added
                index = self._call(event)
            if index not in self._argued and item.arguments:
                self._argued.add(index)
                self._on_arguments(index, item.arguments)
        elif item.type == "message" and item.id not in self._texted and at not in self._texted:
            for part in item.content or ():
                if part.type == "output_text" and part.text:
                    self._on_text(part.text, refusal=False)
                elif part.type == "refusal" and part.refusal:
                    self._on_text(part.refusal, refusal=True)

    def _completed(self, response: _Response, *, incomplete: bool) -> None:
        if response.usage is not None:
            with contextlib.suppress(msgspec.ValidationError):
                self._usage = _chat_usage(msgspec.convert(response.usage, TokenUsage))
        reason = self._default_finish_reason()
        if incomplete:  # cut by the output limit, unless the details say a filter did it
            details = response.incomplete_details
            why = details.get("reason") if isinstance(details, dict) else None
            reason = "content_filter" if why == "content_filter" else "length"
        self._closed = True
        self._finish_reason = reason
        self._on_finish(reason)

    def _fail(self, data: bytes) -> None:
        # Even an undecodable failure is a failure: report it with what we have.
        self._closed = True
        self._failed = _failure(data)
        self._on_failed(self._failed)

    # The hooks: chat_stream writes a chunk for each, or keeps the parts.
    def _on_start(self) -> None:
        pass

    def _on_text(self, text: str, *, refusal: bool) -> None:
        pass

    def _on_call(self, index: int, call_id: str, name: str) -> None:
        pass

    def _on_arguments(self, index: int, arguments: str) -> None:
        pass

    def _on_finish(self, reason: str) -> None:
        pass

    def _on_failed(self, error: ErrorInfo) -> None:
        pass


def _failure(data: bytes) -> ErrorInfo:
    """``response.failed`` nests its error in ``response.error``; an ``error`` event has it at
    the top or, from some backends, in ``error``."""
    try:
        event = msgspec.json.decode(data)
    except msgspec.DecodeError:
        event = None
    found: dict[str, Any] = {}
    if isinstance(event, dict):
        response = event.get("response")
        nested = response.get("error") if isinstance(response, dict) else None
        for candidate in (nested, event.get("error"), event):
            if isinstance(candidate, dict) and (candidate.get("message") or candidate.get("code")):
                found = candidate
                break
    message, code = found.get("message"), found.get("code")
    return ErrorInfo(
        message if isinstance(message, str) and message else NO_MESSAGE,
        "upstream_error" if code is None else str(code),
    )


def _chat_usage(usage: TokenUsage) -> ChatUsage:
    prompt, completion = usage.input_tokens or 0, usage.output_tokens or 0
    cached = usage.cached_tokens
    reasoning = usage.reasoning_tokens
    return ChatUsage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=usage.total_tokens or prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached or 0),
        completion_tokens_details=CompletionTokensDetails(reasoning_tokens=reasoning or 0),
    )
