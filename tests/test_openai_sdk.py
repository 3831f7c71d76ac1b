"""The official ``openai`` Python SDK against a real ``codex-lb serve`` process with API-key
authentication on, the fake upstream behind it: Responses (streamed, not streamed and the
SDK's stream helper), Chat Completions (streamed with usage, not streamed, a function-tool
round trip), the model list, and the SDK's own error classes for a wrong key (401) and a pool
whose every account is limited (429 ``usage_limit_reached``)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI

from tests.client_support import Deployment, deployment
from tests.fake_upstream import FakeUpstream, running_fake
from tests.readme_blocks import code_block, pointed_at

pytestmark = pytest.mark.timeout(120)

MODEL = "gpt-5.1-codex"
NAMES = ("acct-a", "acct-b")
HELLO = re.compile(r"^Hello from (acct-[ab])\.$")
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Looks a number up",
            "parameters": {
                "type": "object",
                "properties": {"x": {"type": "integer"}},
                "required": ["x"],
            },
        },
    }
]


@pytest.fixture(scope="module")
def fake_server() -> Iterator[FakeUpstream]:
    with running_fake() as fake:
        yield fake


@pytest.fixture(scope="module")
def dep(
    redis_url: str, fake_server: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    """One deployment for the module's well-behaved tests (they leave no account limited)."""
    prefix = f"test:{uuid.uuid4().hex[:12]}:"
    data_dir = tmp_path_factory.mktemp("sdk")
    with deployment(redis_url, prefix, data_dir, NAMES, fake=fake_server) as d:
        yield d


@pytest.fixture
def client(dep: Deployment) -> Iterator[OpenAI]:
    with OpenAI(base_url=f"{dep.url}/v1", api_key=dep.key, max_retries=0, timeout=30) as c:
        yield c


def upstream_calls(fake: FakeUpstream, since: int) -> list[dict[str, Any]]:
    return fake.requests(since=since, path="/codex/responses")


def served_by(record: dict[str, Any], dep: Deployment) -> str:
    """The account a forwarded request went out on; never with the client's key."""
    headers = record["headers"]
    assert dep.key not in headers["authorization"]
    assert headers["authorization"].startswith("Bearer ")
    return str(headers["chatgpt-account-id"])


def hello(text: str | None) -> str:
    """The fake account named in its default answer."""
    match = HELLO.match(text or "")
    assert match, text
    return match.group(1)


# --- Responses ---------------------------------------------------------------------------------


def test_responses_not_streamed_streamed_and_the_stream_helper(
    client: OpenAI, dep: Deployment
) -> None:
    since = dep.fake.last_seq()
    response = client.responses.create(model=MODEL, input="Say hello")
    assert response.status == "completed"
    assert response.model == MODEL
    name = hello(response.output_text)
    assert response.usage is not None
    assert response.usage.output_tokens == 5
    [sent] = upstream_calls(dep.fake, since)
    assert served_by(sent, dep) == name
    assert sent["json"]["input"] == "Say hello"
    assert "stream" not in sent["json"]

    since = dep.fake.last_seq()
    events = list(client.responses.create(model=MODEL, input="Say hello", stream=True))
    types = [e.type for e in events]
    assert types[0] == "response.created"
    assert types[-1] == "response.completed"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    completed = events[-1]
    assert completed.type == "response.completed"
    assert completed.response.output_text == deltas
    name = hello(deltas)
    [sent] = upstream_calls(dep.fake, since)
    assert sent["json"]["stream"] is True
    assert served_by(sent, dep) == name

    since = dep.fake.last_seq()
    with client.responses.stream(model=MODEL, input="Say hello") as stream:
        streamed = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert final.output_text == streamed
    name = hello(final.output_text)
    [sent] = upstream_calls(dep.fake, since)
    assert served_by(sent, dep) == name


# --- Chat Completions --------------------------------------------------------------------------


def test_chat_completions_not_streamed_and_streamed_with_usage(
    client: OpenAI, dep: Deployment
) -> None:
    since = dep.fake.last_seq()
    messages: list[Any] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hello"},
    ]
    completion = client.chat.completions.create(model=MODEL, messages=messages)
    assert completion.object == "chat.completion"
    assert completion.model == MODEL
    [choice] = completion.choices
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    name = hello(choice.message.content)
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 5
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 5
    [sent] = upstream_calls(dep.fake, since)
    assert served_by(sent, dep) == name
    upstream = sent["json"]
    assert upstream["stream"] is True  # the proxy streams upstream and gathers the answer
    assert upstream["model"] == MODEL
    user = upstream["input"][-1]
    assert user["role"] == "user"
    assert "Say hello" in json.dumps(user["content"])

    since = dep.fake.last_seq()
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    *body, last = chunks
    # The usage chunk comes last, with no choices; no other chunk carries usage.
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 5
    assert last.usage.prompt_tokens > 0
    assert all(c.usage is None for c in body)
    text = "".join(c.choices[0].delta.content or "" for c in body if c.choices)
    name = hello(text)
    assert [c.choices[0].finish_reason for c in body if c.choices][-1] == "stop"
    [sent] = upstream_calls(dep.fake, since)
    assert served_by(sent, dep) == name


def test_a_function_tool_round_trip_over_chat_completions(client: OpenAI, dep: Deployment) -> None:
    """The fake calls the first function tool offered with ``{"x": 1}``; the tool's result,
    sent back as a ``tool`` message, comes back in its answer ``Tool said: <result>``."""
    messages: list[Any] = [{"role": "user", "content": "Look 1 up"}]
    since = dep.fake.last_seq()
    first = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)
    [choice] = first.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls
    [call] = choice.message.tool_calls
    assert call.type == "function"
    assert call.function.name == "lookup"
    assert json.loads(call.function.arguments) == {"x": 1}
    [sent] = upstream_calls(dep.fake, since)
    [tool] = sent["json"]["tools"]
    assert (tool["type"], tool["name"]) == ("function", "lookup")
    assert tool["parameters"] == TOOLS[0]["function"]["parameters"]

    # The same call, streamed: the arguments arrive in pieces under one tool-call index.
    streamed = list(
        client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, stream=True)
    )
    pieces = [t for c in streamed if c.choices for t in (c.choices[0].delta.tool_calls or [])]
    assert {t.index for t in pieces} == {0}
    assert next(t.id for t in pieces if t.id) == call.id
    assert json.loads("".join(t.function.arguments or "" for t in pieces if t.function)) == {"x": 1}
    assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == "tool_calls"

    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "42"},
    ]
    since = dep.fake.last_seq()
    second = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)
    assert second.choices[0].message.content == "Tool said: 42"
    assert second.choices[0].finish_reason == "stop"
    [sent] = upstream_calls(dep.fake, since)
    items = sent["json"]["input"]
    calls = [i for i in items if i.get("type") == "function_call"]
    outputs = [i for i in items if i.get("type") == "function_call_output"]
    assert [(c["call_id"], c["name"], json.loads(c["arguments"])) for c in calls] == [
        (call.id, "lookup", {"x": 1})
    ]
    assert [(o["call_id"], o["output"]) for o in outputs] == [(call.id, "42")]


def test_models_list(client: OpenAI, dep: Deployment) -> None:
    since = dep.fake.last_seq()
    models = list(client.models.list())
    assert [m.id for m in models] == ["gpt-5.1-codex", "gpt-5.1-codex-mini"]
    assert all(m.object == "model" for m in models)
    [sent] = dep.fake.requests(since=since, path="/codex/models")
    assert served_by(sent, dep) in NAMES


def test_the_readme_snippet_works_as_written(dep: Deployment) -> None:
    """README.md's Python block, pointed at this process and given the key, run as is."""
    snippet = code_block("python")
    assert 'base_url="http://127.0.0.1:2455/v1"' in snippet
    assert snippet.count('"sk-clb-..."') == 1
    source = pointed_at(snippet, dep.url).replace('"sk-clb-..."', repr(dep.key))
    since = dep.fake.last_seq()
    run = subprocess.run(
        [sys.executable, "-c", source], capture_output=True, text=True, timeout=60, check=False
    )
    assert run.returncode == 0, run.stderr
    name = hello(run.stdout.strip())
    [sent] = upstream_calls(dep.fake, since)
    assert served_by(sent, dep) == name


# --- refusals ----------------------------------------------------------------------------------


def test_a_wrong_key_is_an_authentication_error(dep: Deployment) -> None:
    since = dep.fake.last_seq()
    wrong = "sk-clb-" + "A" * 43
    with OpenAI(base_url=f"{dep.url}/v1", api_key=wrong, max_retries=0) as client:
        calls = [
            lambda: client.responses.create(model=MODEL, input="hi"),
            lambda: client.responses.create(model=MODEL, input="hi", stream=True),
            lambda: client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}]
            ),
            lambda: client.models.list(),
        ]
        for call in calls:
            with pytest.raises(openai.AuthenticationError) as refused:
                call()
            error = refused.value
            assert error.status_code == 401
            assert error.code == "invalid_api_key"
            assert error.response.headers["www-authenticate"] == "Bearer"
    assert dep.fake.last_seq() == since  # nothing reached the upstream


def test_every_account_limited_is_a_rate_limit_error(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    """Its own deployment and fake: the accounts stay limited until their reset."""
    with deployment(redis_url, prefix, tmp_path, NAMES) as d:
        now = int(time.time())
        d.fake.configure("acct-a", fail=429, primary_reset_at=now + 600)
        d.fake.configure("acct-b", fail=429, primary_reset_at=now + 300)
        since = d.fake.last_seq()
        with OpenAI(base_url=f"{d.url}/v1", api_key=d.key, max_retries=0) as client:
            calls = [
                lambda: client.responses.create(model=MODEL, input="hi"),
                lambda: client.responses.create(model=MODEL, input="hi", stream=True),
                lambda: client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
                ),
            ]
            for call in calls:
                with pytest.raises(openai.RateLimitError) as limited:
                    call()
                error = limited.value
                assert error.status_code == 429
                assert isinstance(error.body, dict)
                assert error.body["code"] == error.body["type"] == "usage_limit_reached"
                assert error.code == error.type == "usage_limit_reached"
                # The earliest reset of the pool, from the upstream's 429 bodies.
                assert abs(error.body["resets_at"] - (now + 300)) <= 2
                assert 200 < int(error.response.headers["retry-after"]) <= 300
        # Each account was tried once (the first request failed over), then never again.
        statuses = [(r["account_id"], r["status"]) for r in upstream_calls(d.fake, since)]
        assert sorted(statuses) == [("acct-a", 429), ("acct-b", 429)]
