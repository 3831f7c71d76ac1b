"""The real Codex CLI (``codex exec``) against the fake upstream directly, no proxy between.

It proves the fake's stream is one the CLI accepts, and pins down what the CLI sends that the
proxy relies on: the thread id in ``session-id``/``thread-id`` and ``prompt_cache_key``, the same
when the thread is resumed. Skipped only where npm is absent (scripts/codex-cli installs it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.codex_cli import codex_binary, run_codex
from tests.fake_upstream import ANONYMOUS, FakeUpstream

# The first run may install the CLI (scripts/codex-cli, a few seconds to a minute).
pytestmark = pytest.mark.timeout(900)

API_KEY = "sk-codex-lb-test"
THREAD_FIELDS = ("session-id", "thread-id", "x-client-request-id")


@pytest.fixture(scope="module")
def codex() -> str:
    binary = codex_binary()
    if binary is None:
        pytest.skip("npm not found: the Codex CLI (scripts/codex-cli) cannot be installed")
    return binary


@pytest.fixture
def fake(fake_process: FakeUpstream) -> FakeUpstream:
    """The fake (conftest's, one per module), reset; with an API key the CLI sends no
    chatgpt-account-id (``anonymous``)."""
    fake_process.reset()
    fake_process.settings(require_account_id=False)
    return fake_process


def responses(fake: FakeUpstream, since: int = 0) -> list[dict[str, Any]]:
    return fake.requests(since=since, path="/codex/responses")


def test_exec_then_resume_keeps_the_thread(codex: str, fake: FakeUpstream, tmp_path: Path) -> None:
    fake.configure(ANONYMOUS, tool_calls=False, text="The fake says hello.")
    base_url = f"{fake.url}/codex"
    first = run_codex(codex, base_url, "say hello", tmp_path, API_KEY)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "The fake says hello."

    [request] = responses(fake)
    headers, body = request["headers"], request["json"]
    assert headers["authorization"] == f"Bearer {API_KEY}"
    assert "chatgpt-account-id" not in headers
    assert headers["accept"] == "text/event-stream"
    assert headers["originator"] == "codex_exec"
    assert headers["user-agent"].startswith("codex_exec/")
    thread = headers["session-id"]
    assert all(headers[name] == thread for name in THREAD_FIELDS)
    assert body["prompt_cache_key"] == thread
    assert body["stream"] is True
    assert body["model"] == "gpt-5.1-codex"
    assert json.loads(headers["x-codex-turn-metadata"])["history_initialization"] == "new"
    # Nothing but the provider's responses route: no model list, no other route of the fake.
    assert [r["path"] for r in fake.requests()] == ["/codex/responses"]

    fake.configure(ANONYMOUS, text="Second answer.")
    second = run_codex(codex, base_url, "and again", tmp_path, API_KEY, resume=True)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "Second answer."

    [resumed] = responses(fake, since=request["seq"])
    assert all(resumed["headers"][name] == thread for name in THREAD_FIELDS)
    assert resumed["json"]["prompt_cache_key"] == thread
    metadata = json.loads(resumed["headers"]["x-codex-turn-metadata"])
    assert metadata["thread_id"] == thread
    assert metadata["history_initialization"] == "cold_resume"
    # The resumed turn replays the thread: the first answer goes back up as history.
    replayed = [item for item in resumed["json"]["input"] if item.get("role") == "assistant"]
    assert replayed[0]["content"][0]["text"] == "The fake says hello."

    # A new thread (no resume) in the same CODEX_HOME gets a new id.
    third = run_codex(codex, base_url, "new thread", tmp_path, API_KEY)
    assert third.returncode == 0, third.stderr
    [fresh] = responses(fake, since=resumed["seq"])
    assert fresh["headers"]["session-id"] != thread
    assert fresh["json"]["prompt_cache_key"] == fresh["headers"]["session-id"]


def test_tool_call_round_trip(codex: str, fake: FakeUpstream, tmp_path: Path) -> None:
    """The fake calls the CLI's first tool with bad arguments; the CLI answers with the error."""
    result = run_codex(codex, f"{fake.url}/codex", "use a tool", tmp_path, API_KEY)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Tool said: ")

    first, second = responses(fake)
    tool = next(t for t in first["json"]["tools"] if t.get("type") == "function")
    call, output = second["json"]["input"][-2:]
    assert call["type"] == "function_call"
    assert (call["call_id"], call["name"], call["arguments"]) == (
        "call_1",
        tool["name"],
        '{"x": 1}',
    )
    assert output["type"] == "function_call_output"
    assert output["call_id"] == "call_1"
    assert result.stdout.strip() == f"Tool said: {output['output']}"
    assert second["headers"]["session-id"] == first["headers"]["session-id"]
