"""Chat Completions <-> Responses translation: pure functions, no network, no Redis.

Outputs are checked against the official SDK's own types and, end to end, by the SDK itself
reading our bytes through an in-memory transport: what it accepts here, it accepts from the
proxy.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import msgspec
import openai
import pydantic
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessageFunctionToolCall,
)
from openai.types.responses import FunctionToolParam, ResponseInputParam
from openai.types.responses.response_create_params import ResponseCreateParamsStreaming

from service.core.errors import InvalidJSON
from service.proxy.chat import (
    ChatCollector,
    ChatStream,
    ErrorInfo,
    InvalidChatRequest,
    chat_request,
)

Event = tuple[str, bytes]

# --- request ------------------------------------------------------------------------------------


def upstream(chat: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(chat_request(json.dumps(chat).encode()).upstream_body)
    # What the Responses API itself would take, by the SDK's own request types. Those want a
    # replayed assistant turn to carry the id and status of an item the API made, and
    # annotations; the API and the Codex CLI do without, so that shape is checked here alone.
    replayed = [item for item in body["input"] if item.get("role") == "assistant"]
    others = [item for item in body["input"] if item.get("role") != "assistant"]
    pydantic.TypeAdapter(ResponseInputParam).validate_python(others)
    for item in replayed:
        assert set(item) == {"type", "role", "content"}
        for part in item["content"]:
            assert part in (
                {"type": "output_text", "text": part.get("text")},
                {"type": "refusal", "refusal": part.get("refusal")},
            )
    pydantic.TypeAdapter(list[FunctionToolParam]).validate_python(body.get("tools", []))
    pydantic.TypeAdapter(ResponseCreateParamsStreaming).validate_python({**body, "input": others})
    return body


def test_messages_map_to_instructions_and_input_items() -> None:
    body = upstream(
        {
            "model": "gpt-5",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Bonjour"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}},
                        {
                            "type": "image_url",
                            "image_url": {"url": "https://x/y.png", "detail": "low"},
                        },
                    ],
                },
            ],
        }
    )
    assert body["model"] == "gpt-5"
    assert body["instructions"] == "Be brief.\n\nAnswer in French."
    assert body["input"] == [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Bonjour"}],
        },
        {
            "type": "message",
            "role": "user",
            "content": [
                {"type": "input_text", "text": "What is this?"},
                {"type": "input_image", "image_url": "data:image/png;base64,AA", "detail": "auto"},
                {"type": "input_image", "image_url": "https://x/y.png", "detail": "low"},
            ],
        },
    ]
    assert body["store"] is False
    assert body["stream"] is True


def test_instructions_are_an_empty_string_without_system_messages() -> None:
    body = upstream({"model": "m", "messages": [{"role": "user", "content": "Hi"}]})
    assert body["instructions"] == ""
    assert set(body) == {"model", "instructions", "input", "store", "stream"}


def test_tools_and_a_tool_round_trip() -> None:
    body = upstream(
        {
            "model": "m",
            "messages": [
                {"role": "user", "content": "Weather in Paris and Rome?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "weather", "arguments": '{"city":"Paris"}'},
                        },
                        {
                            "id": "call_2",
                            "type": "function",
                            "function": {"name": "weather", "arguments": '{"city":"Rome"}'},
                        },
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "12C"},
                {
                    "role": "tool",
                    "tool_call_id": "call_2",
                    "content": [{"type": "text", "text": "20C"}],
                },
            ],
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "weather",
                        "description": "Current weather",
                        "parameters": {
                            "type": "object",
                            "properties": {"city": {"type": "string"}},
                        },
                    },
                },
                {"type": "function", "function": {"name": "now", "strict": True}},
                {"type": "custom", "custom": {"name": "ignored"}},
            ],
            "tool_choice": {"type": "function", "function": {"name": "weather"}},
            "parallel_tool_calls": True,
        }
    )
    assert body["input"][1:] == [
        {
            "type": "function_call",
            "call_id": "call_1",
            "name": "weather",
            "arguments": '{"city":"Paris"}',
        },
        {
            "type": "function_call",
            "call_id": "call_2",
            "name": "weather",
            "arguments": '{"city":"Rome"}',
        },
        {"type": "function_call_output", "call_id": "call_1", "output": "12C"},
        {"type": "function_call_output", "call_id": "call_2", "output": "20C"},
    ]
    assert body["tools"] == [
        {
            "type": "function",
            "name": "weather",
            "description": "Current weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            "strict": False,
        },
        {
            "type": "function",
            "name": "now",
            "parameters": {"type": "object", "properties": {}},
            "strict": True,
        },
    ]
    assert body["tool_choice"] == {"type": "function", "name": "weather"}
    assert body["parallel_tool_calls"] is True


def test_an_assistant_turn_with_text_and_a_call_keeps_both_in_order() -> None:
    body = upstream(
        {
            "model": "m",
            "messages": [
                {
                    "role": "assistant",
                    "content": "Let me look.",
                    "tool_calls": [
                        {"id": "c", "type": "function", "function": {"name": "f", "arguments": {}}}
                    ],
                },
            ],
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": "required",
        }
    )
    assert [item["type"] for item in body["input"]] == ["message", "function_call"]
    assert body["input"][1]["arguments"] == "{}"  # parsed arguments go back as JSON text
    assert body["tool_choice"] == "required"


def test_tool_choice_is_left_out_without_tools() -> None:
    body = upstream(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "Hi"}],
            "tool_choice": "none",
            "parallel_tool_calls": False,
        }
    )
    assert "tool_choice" not in body
    assert "parallel_tool_calls" not in body


def test_options_that_map_pass_and_the_rest_are_dropped() -> None:
    chat = {
        "model": "gpt-5",
        "messages": [{"role": "user", "content": "Hi"}],
        "reasoning_effort": "high",
        "prompt_cache_key": "thread-1",
        "stream": True,
        "stream_options": {"include_usage": True},
        "store": True,
        "temperature": 0.2,
        "top_p": 0.9,
        "max_tokens": 100,
        "max_completion_tokens": 100,
        "n": 1,
        "stop": ["\n"],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True},
        },
    }
    request = chat_request(json.dumps(chat).encode())
    assert request.stream is True
    assert request.include_usage is True
    assert request.model == "gpt-5"
    assert request.prompt_cache_key == "thread-1"
    body = upstream(chat)
    assert body["reasoning"] == {"effort": "high"}
    assert body["prompt_cache_key"] == "thread-1"
    assert body["store"] is False
    assert body["text"] == {
        "format": {
            "type": "json_schema",
            "name": "answer",
            "schema": {"type": "object"},
            "strict": True,
        }
    }
    for dropped in ("temperature", "top_p", "max_tokens", "max_completion_tokens", "n", "stop"):
        assert dropped not in body


def test_a_plain_request_does_not_stream_and_has_no_cache_key() -> None:
    request = chat_request(b'{"model": "m", "messages": [], "stream_options": {}}')
    assert (request.stream, request.include_usage, request.prompt_cache_key) == (False, False, None)
    assert json.loads(request.upstream_body)["stream"] is True  # the upstream always streams


@pytest.mark.parametrize("body", [b"", b"{", b"not json", b"[1, 2]", b'"text"', b"null"])
def test_a_body_that_is_not_a_json_object_is_invalid_json(body: bytes) -> None:
    with pytest.raises(InvalidJSON) as caught:
        chat_request(body)
    assert caught.value.status == 400


@pytest.mark.parametrize(
    ("chat", "names"),
    [
        ({"messages": []}, "`model`"),
        ({"model": 5, "messages": []}, "`model`"),
        ({"model": "m"}, "`messages`"),
        ({"model": "m", "messages": {"role": "user"}}, "`messages`"),
        ({"model": "m", "messages": ["hi"]}, "`messages[0]`"),
        ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "`messages[0].role`"),
        ({"model": "m", "messages": [{"role": "user"}]}, "`messages[0].content`"),
        ({"model": "m", "messages": [{"role": "user", "content": 3}]}, "`messages[0].content`"),
        (
            {"model": "m", "messages": [{"role": "tool", "content": "12C"}]},
            "`messages[0].tool_call_id`",
        ),
        (
            {
                "model": "m",
                "messages": [
                    {"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}
                ],
            },
            "`messages[0].content[0]`",
        ),
        (
            {
                "model": "m",
                "messages": [
                    {"role": "system", "content": [{"type": "image_url", "image_url": "x"}]}
                ],
            },
            "`messages[0].content[0]`",
        ),
        (
            {
                "model": "m",
                "messages": [
                    {"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]},
                ],
            },
            "`messages[0].tool_calls[0].id`",
        ),
        (
            {"model": "m", "messages": [], "tools": [{"type": "function", "function": {}}]},
            "`tools[0].function.name`",
        ),
    ],
)
def test_an_unusable_request_is_a_400_naming_the_problem(chat: dict[str, Any], names: str) -> None:
    with pytest.raises(InvalidChatRequest) as caught:
        chat_request(json.dumps(chat).encode())
    assert caught.value.status == 400
    assert caught.value.code == "invalid_request_error"
    assert names in caught.value.message


# --- upstream events ----------------------------------------------------------------------------


def event(kind: str, **fields: Any) -> Event:
    return kind, json.dumps({"type": kind, **fields}).encode()


def created() -> Event:
    return event("response.created", response={"id": "resp_abc", "status": "in_progress"})


def text_delta(text: str, item_id: str = "msg_1", output_index: int = 0) -> Event:
    return event(
        "response.output_text.delta",
        item_id=item_id,
        output_index=output_index,
        content_index=0,
        delta=text,
    )


def call_added(output_index: int, item_id: str, call_id: str, name: str) -> Event:
    item = {"type": "function_call", "id": item_id, "call_id": call_id, "name": name}
    return event(
        "response.output_item.added", output_index=output_index, item={**item, "arguments": ""}
    )


def call_done(output_index: int, item_id: str, call_id: str, name: str, arguments: str) -> Event:
    item = {"type": "function_call", "id": item_id, "call_id": call_id, "name": name}
    return event(
        "response.output_item.done",
        output_index=output_index,
        item={**item, "arguments": arguments},
    )


USAGE = {
    "input_tokens": 30,
    "input_tokens_details": {"cached_tokens": 10},
    "output_tokens": 12,
    "output_tokens_details": {"reasoning_tokens": 4},
    "total_tokens": 42,
}


def completed(usage: dict[str, Any] | None = USAGE) -> Event:
    return event(
        "response.completed", response={"id": "resp_abc", "status": "completed", "usage": usage}
    )


TEXT_EVENTS = [
    created(),
    event("response.in_progress", response={"id": "resp_abc"}),
    event("codex.rate_limits", primary={"used_percent": 3}),
    event("response.output_item.added", output_index=0, item={"type": "reasoning", "id": "rs_1"}),
    event("response.reasoning_summary_text.delta", item_id="rs_1", delta="thinking"),
    ("response.output_text.delta", b"{not json"),
    event("response.some_future_event", anything=[1, 2]),
    event(
        "response.output_item.added",
        output_index=1,
        item={"type": "message", "id": "msg_1", "role": "assistant", "content": []},
    ),
    text_delta("Hel", output_index=1),
    text_delta("lo", output_index=1),
    event("response.output_text.done", item_id="msg_1", output_index=1, text="Hello"),
    event(
        "response.output_item.done",
        output_index=1,
        item={
            "type": "message",
            "id": "msg_1",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Hello", "annotations": []}],
        },
    ),
    completed(),
]

TOOL_EVENTS = [
    created(),
    call_added(0, "fc_1", "call_a", "weather"),
    event(
        "response.function_call_arguments.delta", item_id="fc_1", output_index=0, delta='{"city":'
    ),
    event(
        "response.function_call_arguments.delta", item_id="fc_1", output_index=0, delta='"Paris"}'
    ),
    event("response.function_call_arguments.done", item_id="fc_1", output_index=0, arguments="x"),
    call_done(0, "fc_1", "call_a", "weather", '{"city":"Paris"}'),
    call_added(1, "fc_2", "call_b", "time"),
    # No item id: found by its position in the output.
    event("response.function_call_arguments.delta", output_index=1, delta='{"tz":'),
    event("response.function_call_arguments.delta", output_index=1, delta='"CET"}'),
    call_done(1, "fc_2", "call_b", "time", '{"tz":"CET"}'),
    completed(),
]


def sse(raw: bytes) -> list[Any]:
    """The SSE payloads: each chunk as JSON, ``[DONE]`` as the string itself."""
    assert raw.endswith(b"\n\n")
    payloads: list[Any] = []
    for frame in raw.split(b"\n\n")[:-1]:
        assert frame.startswith(b"data: ")
        data = frame.removeprefix(b"data: ")
        payloads.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return payloads


def run_stream(events: list[Event], include_usage: bool = False) -> tuple[ChatStream, list[Any]]:
    stream = ChatStream("gpt-5", include_usage, created=1700000000)
    raw = b"".join(stream.feed(kind, data) for kind, data in events) + stream.finish()
    payloads = sse(raw)
    for payload in payloads[:-1]:
        ChatCompletionChunk.model_validate(payload)  # the SDK takes every chunk
    assert payloads[-1] == "[DONE]"
    return stream, payloads[:-1]


def deltas(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [chunk["choices"][0]["delta"] for chunk in chunks if chunk["choices"]]


def test_a_text_stream() -> None:
    stream, chunks = run_stream(TEXT_EVENTS)
    assert deltas(chunks) == [
        {"role": "assistant", "content": ""},
        {"content": "Hel"},
        {"content": "lo"},
        {},
    ]
    assert [chunk["choices"][0]["finish_reason"] for chunk in chunks] == [None, None, None, "stop"]
    assert {chunk["id"] for chunk in chunks} == {"chatcmpl-abc"}
    assert {chunk["created"] for chunk in chunks} == {1700000000}
    assert {chunk["model"] for chunk in chunks} == {"gpt-5"}
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert all("usage" not in chunk for chunk in chunks)
    assert stream.failed is None
    assert stream.complete
    assert stream.finish() == b""  # once


def test_a_stream_with_two_tool_calls() -> None:
    _, chunks = run_stream(TOOL_EVENTS)
    assert [d.get("tool_calls") for d in deltas(chunks)] == [
        None,
        [
            {
                "index": 0,
                "id": "call_a",
                "type": "function",
                "function": {"name": "weather", "arguments": ""},
            }
        ],
        [{"index": 0, "function": {"arguments": '{"city":'}}],
        [{"index": 0, "function": {"arguments": '"Paris"}'}}],
        [
            {
                "index": 1,
                "id": "call_b",
                "type": "function",
                "function": {"name": "time", "arguments": ""},
            }
        ],
        [{"index": 1, "function": {"arguments": '{"tz":'}}],
        [{"index": 1, "function": {"arguments": '"CET"}'}}],
        None,
    ]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    # The SDK's own accumulator puts the calls back together.
    state = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    message = state.get_final_completion().choices[0].message
    assert [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or []] == [
        ("call_a", "weather", '{"city":"Paris"}'),
        ("call_b", "time", '{"tz":"CET"}'),
    ]


def test_arguments_never_streamed_arrive_with_the_item() -> None:
    events = [
        created(),
        call_added(0, "fc_1", "call_a", "now"),
        call_done(0, "fc_1", "call_a", "now", "{}"),
        # An item never announced by output_item.added still becomes a call.
        call_done(1, "fc_2", "call_b", "later", '{"in":1}'),
        completed(),
    ]
    _, chunks = run_stream(events)
    calls = [d["tool_calls"][0] for d in deltas(chunks) if "tool_calls" in d]
    assert calls == [
        {
            "index": 0,
            "id": "call_a",
            "type": "function",
            "function": {"name": "now", "arguments": ""},
        },
        {"index": 0, "function": {"arguments": "{}"}},
        {
            "index": 1,
            "id": "call_b",
            "type": "function",
            "function": {"name": "later", "arguments": ""},
        },
        {"index": 1, "function": {"arguments": '{"in":1}'}},
    ]


def test_usage_is_the_last_chunk_before_done_only_when_asked_for() -> None:
    _, chunks = run_stream(TEXT_EVENTS, include_usage=True)
    assert [chunk for chunk in chunks if "usage" in chunk] == [chunks[-1]]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["id"] == "chatcmpl-abc"
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 30,
        "completion_tokens": 12,
        "total_tokens": 42,
        "prompt_tokens_details": {"cached_tokens": 10},
        "completion_tokens_details": {"reasoning_tokens": 4},
    }
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    _, without = run_stream(TEXT_EVENTS, include_usage=False)
    assert all("usage" not in chunk for chunk in without)


def test_an_incomplete_response_finishes_with_length() -> None:
    events = [
        created(),
        text_delta("Hel"),
        event(
            "response.incomplete",
            response={
                "id": "resp_abc",
                "incomplete_details": {"reason": "max_output_tokens"},
                "usage": USAGE,
            },
        ),
    ]
    stream, chunks = run_stream(events, include_usage=True)
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["total_tokens"] == 42
    assert stream.complete


def test_a_cut_stream_still_ends_but_is_not_complete() -> None:
    stream, chunks = run_stream([text_delta("Hi")], include_usage=True)
    assert deltas(chunks) == [{"role": "assistant", "content": ""}, {"content": "Hi"}, {}]
    assert chunks[0]["id"].startswith("chatcmpl-")
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert chunks[-1]["usage"]["total_tokens"] == 0
    assert not stream.complete
    assert stream.failed is None


def test_events_without_an_event_name_are_read_by_their_type() -> None:
    events = [("", data) for _, data in TEXT_EVENTS]
    _, chunks = run_stream(events)
    assert [d.get("content") for d in deltas(chunks)] == ["", "Hel", "lo", None]


def test_a_message_whose_text_never_streamed_arrives_with_the_item() -> None:
    item = {"type": "message", "id": "msg_1", "content": [{"type": "output_text", "text": "Whole"}]}
    events = [created(), event("response.output_item.done", output_index=0, item=item), completed()]
    _, chunks = run_stream(events)
    assert [d.get("content") for d in deltas(chunks)] == ["", "Whole", None]


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (
            event(
                "response.failed",
                response={
                    "id": "resp_abc",
                    "status": "failed",
                    "error": {"code": "rate_limit_exceeded", "message": "Slow down"},
                },
            ),
            ErrorInfo("Slow down", "rate_limit_exceeded"),
        ),
        (
            event("error", code="context_length_exceeded", message="Too long", param=None),
            ErrorInfo("Too long", "context_length_exceeded"),
        ),
        (
            event("error", error={"type": "server_error", "message": "Boom"}),
            ErrorInfo("Boom", "upstream_error"),
        ),
        (
            ("error", b"{oops"),
            ErrorInfo("The upstream failed without saying why", "upstream_error"),
        ),
    ],
)
def test_a_failure_is_an_error_chunk_and_sets_failed(failure: Event, expected: ErrorInfo) -> None:
    stream = ChatStream("gpt-5", include_usage=True, created=1)
    started = stream.feed(*created()) + stream.feed(*text_delta("Hi"))
    raw = stream.feed(*failure)
    assert sse(raw) == [
        {"error": {"message": expected.message, "type": "server_error", "code": expected.code}}
    ]
    assert stream.failed == expected
    assert stream.complete
    assert stream.feed(*text_delta("more")) == b""  # nothing after the failure
    assert stream.finish() == b"data: [DONE]\n\n"
    assert len(sse(started)) == 2


# --- the SDK itself, reading our bytes ----------------------------------------------------------


def sdk_client(body: bytes, content_type: str) -> openai.OpenAI:
    def answer(_: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": content_type})

    transport = httpx.MockTransport(answer)
    return openai.OpenAI(
        api_key="k",
        base_url="http://proxy/v1",
        http_client=httpx.Client(transport=transport),  # the SDK takes an httpx client too
        max_retries=0,
    )


def test_the_sdk_streams_text_tool_calls_and_usage() -> None:
    stream = ChatStream("gpt-5", include_usage=True)
    raw = b"".join(stream.feed(kind, data) for kind, data in TOOL_EVENTS[:-1] + TEXT_EVENTS[2:])
    client = sdk_client(raw + stream.finish(), "text/event-stream")
    chunks = list(
        client.chat.completions.create(
            model="gpt-5",
            messages=[{"role": "user", "content": "Hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 42
    assert chunks[-2].choices[0].finish_reason == "tool_calls"


def test_the_sdk_raises_a_streamed_failure() -> None:
    stream = ChatStream("gpt-5", include_usage=False)
    failure = event("error", code="server_error", message="Upstream broke")
    raw = stream.feed(*created()) + stream.feed(*failure) + stream.finish()
    client = sdk_client(raw, "text/event-stream")
    with pytest.raises(openai.APIError, match="Upstream broke"):
        list(client.chat.completions.create(model="gpt-5", messages=[], stream=True))


# --- collector ----------------------------------------------------------------------------------


def collect(events: list[Event]) -> tuple[ChatCollector, dict[str, Any]]:
    collector = ChatCollector("gpt-5", created=1700000000)
    for kind, data in events:
        collector.feed(kind, data)
    result: dict[str, Any] = msgspec.json.decode(collector.result())
    ChatCompletion.model_validate(result)
    return collector, result


def test_the_collector_aggregates_text() -> None:
    collector, result = collect(TEXT_EVENTS)
    assert result == {
        "id": "chatcmpl-abc",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt-5",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello", "refusal": None},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": 30,
            "completion_tokens": 12,
            "total_tokens": 42,
            "prompt_tokens_details": {"cached_tokens": 10},
            "completion_tokens_details": {"reasoning_tokens": 4},
        },
    }
    assert collector.failed is None
    assert collector.complete


def test_the_collector_aggregates_tool_calls() -> None:
    _, result = collect(TOOL_EVENTS)
    choice = result["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    assert choice["message"]["tool_calls"] == [
        {
            "id": "call_a",
            "type": "function",
            "function": {"name": "weather", "arguments": '{"city":"Paris"}'},
        },
        {
            "id": "call_b",
            "type": "function",
            "function": {"name": "time", "arguments": '{"tz":"CET"}'},
        },
    ]
    # And the SDK reads it as a completion with parsed-ready tool calls.
    completion = sdk_client(
        msgspec.json.encode(result), "application/json"
    ).chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "Hi"}])
    arguments = []
    for call in completion.choices[0].message.tool_calls or []:
        assert isinstance(call, ChatCompletionMessageFunctionToolCall)
        arguments.append(json.loads(call.function.arguments))
    assert arguments == [{"city": "Paris"}, {"tz": "CET"}]


def test_the_collector_reports_a_failure() -> None:
    failure = event(
        "response.failed", response={"error": {"code": "server_error", "message": "Nope"}}
    )
    collector, _ = collect([created(), text_delta("Hi"), failure])
    assert collector.failed == ErrorInfo("Nope", "server_error")
