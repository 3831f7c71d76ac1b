"""Chat Completions answers written from an upstream Responses stream: chunk by chunk for a
streaming client (``ChatStream``), or one ``chat.completion`` for the others (``ChatCollector``).

Both follow the upstream with ``chat_events.ResponseReader``; the shapes below are OpenAI's, so
the official SDKs parse them (tests/test_chat_translation.py checks that against their types).
"""

from __future__ import annotations

import time

import msgspec

from service.proxy.chat_events import ChatUsage, ErrorInfo, ResponseReader

_encode = msgspec.json.Encoder().encode

DONE = b"data: [DONE]\n\n"


# omit_defaults: a chunk's delta carries only what it adds, as OpenAI's do.
class _Function(msgspec.Struct, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class _ToolCallDelta(msgspec.Struct, omit_defaults=True):
    index: int
    id: str | None = None
    type: str | None = None
    function: _Function | None = None


class _ChunkDelta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[_ToolCallDelta] | None = None


class _ChunkChoice(msgspec.Struct):
    index: int
    delta: _ChunkDelta
    finish_reason: str | None  # null until the last chunk, but always present


class _Chunk(msgspec.Struct, omit_defaults=True):
    id: str
    object: str
    created: int
    model: str
    choices: list[_ChunkChoice]
    usage: ChatUsage | None = None


class _StreamError(msgspec.Struct):
    message: str
    type: str
    code: str


class _ErrorChunk(msgspec.Struct):
    error: _StreamError


class _CalledFunction(msgspec.Struct):
    name: str
    arguments: str


class _ToolCall(msgspec.Struct):
    id: str
    type: str
    function: _CalledFunction


class _Message(msgspec.Struct, omit_defaults=True):
    role: str
    content: str | None
    refusal: str | None
    tool_calls: list[_ToolCall] | None = None


class _Choice(msgspec.Struct):
    index: int
    message: _Message
    finish_reason: str
    logprobs: None = None


class _Completion(msgspec.Struct):
    id: str
    object: str
    created: int
    model: str
    choices: list[_Choice]
    usage: ChatUsage


def _sse(payload: msgspec.Struct) -> bytes:
    return b"data: " + _encode(payload) + b"\n\n"


class ChatStream(ResponseReader):
    """Translates upstream Responses SSE events into Chat Completions chunks.

    ``feed`` each upstream event, then ``finish`` once the upstream is done (or gone). Every
    chunk of one stream shares one id and ``created``. After a failure (``failed`` is set and
    ``feed`` returned an ``{"error": ...}`` chunk, which the SDKs raise as an APIError),
    ``finish`` writes only ``[DONE]``.
    """

    def __init__(
        self,
        model: str,
        include_usage: bool,
        created: int | None = None,
        chunk_id: str | None = None,
    ) -> None:
        super().__init__(chunk_id)
        self._model = model
        self._include_usage = include_usage
        self._created = int(time.time()) if created is None else created
        self._out: list[bytes] = []
        self._started = False  # the role chunk was written
        self._finished = False  # the finish_reason chunk was written
        self._ended = False  # [DONE] was written

    def feed(self, event: str, data: bytes) -> bytes:
        """One upstream event (its ``event:`` name and ``data:`` bytes) as zero or more
        SSE-encoded chunks, concatenated."""
        self._read(event, data)
        return self._flush()

    def finish(self) -> bytes:
        """The finish_reason chunk if not written yet, the usage chunk when asked for (the last
        before ``[DONE]``, as OpenAI sends it), then ``[DONE]``; b"" when called again."""
        if self._ended:
            return b""
        self._ended = self._closed = True
        if self._failed is None:
            if not self._finished:
                self._on_finish(self._default_finish_reason())
            if self._include_usage:
                usage = self._usage or ChatUsage()
                self._out.append(_sse(self._chunk([], usage)))
        self._out.append(DONE)
        return self._flush()

    def _flush(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def _chunk(self, choices: list[_ChunkChoice], usage: ChatUsage | None = None) -> _Chunk:
        return _Chunk(self.id, "chat.completion.chunk", self._created, self._model, choices, usage)

    def _emit(self, delta: _ChunkDelta, finish_reason: str | None = None) -> None:
        self._on_start()
        self._out.append(_sse(self._chunk([_ChunkChoice(0, delta, finish_reason)])))

    def _on_start(self) -> None:
        # A client reads the role from the first chunk, so the first one always says it, even
        # when the upstream skipped response.created.
        if not self._started:
            self._started = True
            first = _ChunkDelta(role="assistant", content="")
            self._out.append(_sse(self._chunk([_ChunkChoice(0, first, None)])))

    def _on_text(self, text: str, *, refusal: bool) -> None:
        self._emit(_ChunkDelta(refusal=text) if refusal else _ChunkDelta(content=text))

    def _on_call(self, index: int, call_id: str, name: str) -> None:
        call = _ToolCallDelta(index, call_id, "function", _Function(name=name, arguments=""))
        self._emit(_ChunkDelta(tool_calls=[call]))

    def _on_arguments(self, index: int, arguments: str) -> None:
        call = _ToolCallDelta(index, function=_Function(arguments=arguments))
        self._emit(_ChunkDelta(tool_calls=[call]))

    def _on_finish(self, reason: str) -> None:
        self._finished = True
        self._emit(_ChunkDelta(), reason)

    def _on_failed(self, error: ErrorInfo) -> None:
        self._out.append(_sse(_ErrorChunk(_StreamError(error.message, "server_error", error.code))))


class ChatCollector(ResponseReader):
    """Aggregates upstream Responses SSE events into one chat.completion object (non-streamed
    client). ``result`` reads what was fed so far; check ``failed`` (and ``complete``) first."""

    def __init__(self, model: str, created: int | None = None) -> None:
        super().__init__(None)
        self._model = model
        self._created = int(time.time()) if created is None else created
        self._text: list[str] = []
        self._refusal: list[str] = []
        self._calls: list[tuple[str, str, list[str]]] = []  # call id, name, argument pieces

    def feed(self, event: str, data: bytes) -> None:
        self._read(event, data)

    def result(self) -> bytes:
        """JSON bytes of the chat.completion."""
        calls = [
            _ToolCall(call_id, "function", _CalledFunction(name, "".join(arguments)))
            for call_id, name, arguments in self._calls
        ]
        text = "".join(self._text)
        message = _Message(
            role="assistant",
            # OpenAI answers a tool-call-only turn with null content, a text turn with a string.
            content=text if text or not calls else None,
            refusal="".join(self._refusal) or None,
            tool_calls=calls or None,
        )
        reason = self._finish_reason or self._default_finish_reason()
        completion = _Completion(
            id=self.id,
            object="chat.completion",
            created=self._created,
            model=self._model,
            choices=[_Choice(0, message, reason)],
            usage=self._usage or ChatUsage(),
        )
        return _encode(completion)

    def _on_text(self, text: str, *, refusal: bool) -> None:
        (self._refusal if refusal else self._text).append(text)

    def _on_call(self, index: int, call_id: str, name: str) -> None:
        self._calls.append((call_id, name, []))

    def _on_arguments(self, index: int, arguments: str) -> None:
        self._calls[index][2].append(arguments)
