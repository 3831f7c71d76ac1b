"""The chat translation as a stream filter: upstream Responses events in, Chat Completions
chunks out (``chat`` does the mapping; this feeds it whole events as the bytes arrive)."""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from service.proxy.chat import ChatStream
from service.proxy.sse import EventReader


class ChatTranslation:
    def __init__(self, stream: ChatStream, on_event: Callable[[str, bytes], None]):
        self.stream = stream
        self.reader = EventReader()
        self.on_event = on_event
        self._ended = False

    def _events(self, events: list[tuple[str, bytes]]) -> bytes:
        out = []
        for name, data in events:
            self.on_event(name, data)
            out.append(self.stream.feed(name, data))
        return b"".join(out)

    @property
    def finished(self) -> bool:
        return self.stream.complete or self.stream.failed is not None

    def chunk(self, data: bytes) -> bytes:
        return self._events(self.reader.feed(data))

    def end(self) -> bytes:
        self._ended = True
        return self._events(self.reader.close()) + self.stream.finish()

    def failed(self, reason: str) -> bytes:
        if self._ended:
            return b""
        self._ended = True
        error = {"error": {"message": reason, "type": "server_error", "code": "upstream_error"}}
        return b"data: " + msgspec.json.encode(error) + b"\n\ndata: [DONE]\n\n"
