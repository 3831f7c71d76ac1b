"""The token counts the upstream reports in a Responses answer (``response.usage``), read
leniently: a field missing or of an unexpected shape means "not told", never an error. The chat
translation turns them into Chat Completions usage; the request log keeps them."""

from __future__ import annotations

import msgspec


class InputDetails(msgspec.Struct):
    cached_tokens: int | None = None


class OutputDetails(msgspec.Struct):
    reasoning_tokens: int | None = None


class TokenUsage(msgspec.Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    input_tokens_details: InputDetails | None = None
    output_tokens_details: OutputDetails | None = None

    @property
    def cached_tokens(self) -> int | None:
        return self.input_tokens_details.cached_tokens if self.input_tokens_details else None

    @property
    def reasoning_tokens(self) -> int | None:
        return self.output_tokens_details.reasoning_tokens if self.output_tokens_details else None
