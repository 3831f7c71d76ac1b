"""``POST /v1/chat/completions`` over an upstream that speaks only the Responses API.

The translation is pure (no I/O) and lives in three modules, kept apart by size:
``chat_request`` rewrites the request, ``chat_events`` reads the upstream's SSE events and
``chat_stream`` writes the chat answer, streamed or whole. Import from here.
"""

from __future__ import annotations

from service.proxy.chat_events import ChatUsage, ErrorInfo
from service.proxy.chat_request import ChatRequest, InvalidChatRequest, chat_request
from service.proxy.chat_stream import DONE, ChatCollector, ChatStream

__all__ = [
    "DONE",
    "ChatCollector",
    "ChatRequest",
    "ChatStream",
    "ChatUsage",
    "ErrorInfo",
    "InvalidChatRequest",
    "chat_request",
]
