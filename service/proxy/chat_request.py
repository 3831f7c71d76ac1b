"""A Chat Completions request, rewritten as the Responses request the Codex backend takes.

Lenient where the client asks for something the upstream cannot do: sampling and length knobs
(``temperature``, ``top_p``, ``max_tokens``, ``max_completion_tokens``, ``n``, ``stop``,
``seed``, ``logprobs``...) are dropped, because the ChatGPT Codex backend rejects several of
them outright and a client of an OpenAI-compatible proxy expects an answer, not a 400 about a
knob. Strict where a guess would change the conversation: a message or content part we cannot
place is a 400 naming it, never silently left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from service.core.errors import InvalidJSON, ServiceError

Json = dict[str, Any]

_encoder = msgspec.json.Encoder()

# A function declared without ``parameters`` takes none (Chat Completions' rule); the Responses
# API wants a schema, so say "no arguments" explicitly.
_NO_PARAMETERS: Json = {"type": "object", "properties": {}}


class InvalidChatRequest(ServiceError):
    status, code, message = 400, "invalid_request_error", "Invalid chat completion request"


@dataclass(frozen=True, slots=True)
class ChatRequest:
    upstream_body: bytes  # the Responses request; always ``"stream": true``
    stream: bool  # whether the client asked for a stream (we aggregate when it did not)
    include_usage: bool  # stream_options.include_usage
    model: str
    prompt_cache_key: str | None  # passed upstream as is; also a sticky thread id


def chat_request(body: bytes) -> ChatRequest:
    """The upstream request for a ``POST /v1/chat/completions`` body.

    Raises ``InvalidJSON`` when the body is not a JSON object and ``InvalidChatRequest`` when
    it is not a chat request we can translate.
    """
    try:
        chat = msgspec.json.decode(body)
    except msgspec.DecodeError:
        raise InvalidJSON() from None
    if not isinstance(chat, dict):
        raise InvalidJSON("Request body must be a JSON object")
    model = chat.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidChatRequest("`model` must be a non-empty string")
    messages = chat.get("messages")
    if not isinstance(messages, list):
        raise InvalidChatRequest("`messages` must be a list")
    instructions, items = _conversation(messages)
    # The Codex backend requires ``instructions``, even empty.
    upstream: Json = {"model": model, "instructions": instructions, "input": items}
    tools = _tools(chat.get("tools"))
    if tools:
        upstream["tools"] = tools
        # Only next to tools: without any, a tool choice is an upstream 400 for nothing.
        choice = _tool_choice(chat.get("tool_choice"))
        if choice is not None:
            upstream["tool_choice"] = choice
        if isinstance(chat.get("parallel_tool_calls"), bool):
            upstream["parallel_tool_calls"] = chat["parallel_tool_calls"]
    effort = chat.get("reasoning_effort")
    if isinstance(effort, str):
        upstream["reasoning"] = {"effort": effort}
    text = _text_options(chat.get("response_format"), chat.get("verbosity"))
    if text:
        upstream["text"] = text
    # The ChatGPT backend keeps nothing and refuses ``store: true``; it always streams, and a
    # non-streamed client gets the stream aggregated by ChatCollector.
    upstream["store"] = False
    upstream["stream"] = True
    cache_key = chat.get("prompt_cache_key")
    if not isinstance(cache_key, str) or not cache_key:
        cache_key = None
    else:
        upstream["prompt_cache_key"] = cache_key
    options = chat.get("stream_options")
    return ChatRequest(
        upstream_body=_encoder.encode(upstream),
        stream=chat.get("stream") is True,
        include_usage=isinstance(options, dict) and options.get("include_usage") is True,
        model=model,
        prompt_cache_key=cache_key,
    )


def _conversation(messages: list[Any]) -> tuple[str, list[Json]]:
    """``instructions`` (every system and developer message) and the ``input`` items."""
    instructions: list[str] = []
    items: list[Json] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InvalidChatRequest(f"`{where}` must be an object")
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            # Responses has one instructions string; the position of a late system message in
            # the conversation is lost, which is how the Codex backend wants it anyway.
            text = _plain_text(content, where)
            if text:
                instructions.append(text)
        elif role == "user":
            user = _user_parts(content, where)
            items.append({"type": "message", "role": "user", "content": user})
        elif role == "assistant":
            items.extend(_assistant(message, where))
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise InvalidChatRequest(f"`{where}.tool_call_id` must be a non-empty string")
            output = _plain_text(content, where)
            items.append({"type": "function_call_output", "call_id": call_id, "output": output})
        else:
            raise InvalidChatRequest(
                f"`{where}.role` must be system, developer, user, assistant or tool"
            )
    return "\n\n".join(instructions), items


def _parts(content: Any, where: str) -> list[Json]:
    """``content`` as a list of parts: a string is one text part, null is none."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise InvalidChatRequest(f"`{where}.content` must be a string or a list of parts")
    for j, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise InvalidChatRequest(f"`{where}.content[{j}]` must be an object with a `type`")
    return content


def _part_text(part: Json, where: str) -> str:
    text = part.get("text")
    if not isinstance(text, str):
        raise InvalidChatRequest(f"`{where}.text` must be a string")
    return text


def _plain_text(content: Any, where: str) -> str:
    """Text-only content (system, developer, tool) as one string."""
    texts: list[str] = []
    for j, part in enumerate(_parts(content, where)):
        if part["type"] != "text":
            raise InvalidChatRequest(f"`{where}.content[{j}]` must be a text part")
        texts.append(_part_text(part, f"{where}.content[{j}]"))
    # A newline keeps the words of two parts apart; a client that split its prompt into parts
    # meant separate blocks.
    return "\n".join(texts)


def _user_parts(content: Any, where: str) -> list[Json]:
    if content is None:
        raise InvalidChatRequest(f"`{where}.content` is required")
    parts: list[Json] = []
    for j, part in enumerate(_parts(content, where)):
        at = f"{where}.content[{j}]"
        kind = part["type"]
        if kind == "text":
            parts.append({"type": "input_text", "text": _part_text(part, at)})
        elif kind == "image_url":
            parts.append(_image(part.get("image_url"), at))
        elif kind == "file":
            parts.append(_file(part.get("file"), at))
        else:
            raise InvalidChatRequest(f"`{at}` has an unsupported type {kind!r}")
    return parts


def _image(image: Any, where: str) -> Json:
    # Some clients send the URL itself rather than ``{"url": ...}``.
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str) or not url:
        raise InvalidChatRequest(f"`{where}.image_url.url` must be a non-empty string")
    detail = image.get("detail") if isinstance(image, dict) else None
    # "auto" is both APIs' default; the Responses SDK types want it said.
    return {"type": "input_image", "image_url": url, "detail": detail or "auto"}


def _file(file: Any, where: str) -> Json:
    if not isinstance(file, dict):
        raise InvalidChatRequest(f"`{where}.file` must be an object")
    part: Json = {"type": "input_file"}
    for key in ("file_data", "file_id", "filename"):
        if isinstance(file.get(key), str):
            part[key] = file[key]
    if len(part) == 1:
        raise InvalidChatRequest(f"`{where}.file` needs `file_data` or `file_id`")
    return part


def _assistant(message: Json, where: str) -> list[Json]:
    """An assistant turn: its text as one message item, then one item per tool call."""
    content: list[Json] = []
    for j, part in enumerate(_parts(message.get("content"), where)):
        at = f"{where}.content[{j}]"
        if part["type"] == "text":
            text = _part_text(part, at)
            if text:  # an empty text part says nothing, and a tool-call turn often has one
                content.append({"type": "output_text", "text": text})
        elif part["type"] == "refusal" and isinstance(part.get("refusal"), str):
            content.append({"type": "refusal", "refusal": part["refusal"]})
        else:
            raise InvalidChatRequest(f"`{at}` must be a text or refusal part")
    refusal = message.get("refusal")
    if isinstance(refusal, str) and refusal and not any(p["type"] == "refusal" for p in content):
        content.append({"type": "refusal", "refusal": refusal})
    items: list[Json] = []
    if content:
        items.append({"type": "message", "role": "assistant", "content": content})
    calls = message.get("tool_calls")
    if calls is None:
        return items
    if not isinstance(calls, list):
        raise InvalidChatRequest(f"`{where}.tool_calls` must be a list")
    for k, call in enumerate(calls):
        items.append(_tool_call(call, f"{where}.tool_calls[{k}]"))
    return items


def _tool_call(call: Any, where: str) -> Json:
    if not isinstance(call, dict) or call.get("type", "function") != "function":
        raise InvalidChatRequest(f"`{where}` must be a function tool call")
    call_id = call.get("id")
    function = call.get("function")
    if not isinstance(call_id, str) or not call_id:
        raise InvalidChatRequest(f"`{where}.id` must be a non-empty string")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise InvalidChatRequest(f"`{where}.function.name` must be a string")
    arguments = function.get("arguments")
    if arguments is None:
        arguments = "{}"
    elif not isinstance(arguments, str):
        # Some clients echo the arguments back parsed; the upstream wants the JSON text.
        arguments = _encoder.encode(arguments).decode()
    return {
        "type": "function_call",
        "call_id": call_id,
        "name": function["name"],
        "arguments": arguments,
    }


def _tools(tools: Any) -> list[Json]:
    """Function tools, flattened the Responses way; other kinds are left out (lenient)."""
    if not isinstance(tools, list):
        return []
    out: list[Json] = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            continue
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidChatRequest(f"`tools[{i}].function.name` must be a string")
        flat: Json = {"type": "function", "name": function["name"]}
        if isinstance(function.get("description"), str):
            flat["description"] = function["description"]
        parameters = function.get("parameters")
        flat["parameters"] = parameters if isinstance(parameters, dict) else _NO_PARAMETERS
        # Chat Completions defaults to non-strict schemas, Responses to strict ones; a schema
        # written for the former is often refused by the latter, so say false unless asked.
        flat["strict"] = function.get("strict") is True
        out.append(flat)
    return out


def _tool_choice(choice: Any) -> str | Json | None:
    if isinstance(choice, str):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return {"type": "function", "name": function["name"]}
    return None


def _text_options(response_format: Any, verbosity: Any) -> Json:
    """Responses' ``text``: the output format (structured outputs) and verbosity."""
    text: Json = {}
    if isinstance(response_format, dict):
        kind = response_format.get("type")
        if kind == "json_object":
            text["format"] = {"type": "json_object"}
        elif kind == "json_schema" and isinstance(response_format.get("json_schema"), dict):
            spec = response_format["json_schema"]
            schema_format: Json = {"type": "json_schema", "name": spec.get("name") or "response"}
            for key in ("description", "schema", "strict"):
                if key in spec:
                    schema_format[key] = spec[key]
            text["format"] = schema_format
    if isinstance(verbosity, str):
        text["verbosity"] = verbosity
    return text
