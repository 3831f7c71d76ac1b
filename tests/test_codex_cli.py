"""The real Codex CLI (0.171.0, ``codex exec``) through a real ``codex-lb serve`` process with
API-key authentication on, two accounts on the fake upstream behind it: the answer reaches the
CLI, a resumed conversation stays on its account, new conversations spread over the pool, the
README's config.toml works as written and contacts nothing else, and a pool whose every account
is limited shows the CLI's own usage-limit message. Skipped only where npm is absent."""

from __future__ import annotations

import re
import time
import tomllib
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests import codex_cli
from tests.client_support import ConnectRecorder, Deployment, deployment
from tests.codex_cli import codex_binary, run_codex
from tests.readme_blocks import code_block, pointed_at

# The first run may install the CLI (scripts/codex-cli, a few seconds to a minute).
pytestmark = pytest.mark.timeout(900)

NAMES = ("acct-x", "acct-y")
HELLO = re.compile(r"^Hello from (acct-[xy])\.$")
# What the CLI sends for its thread (tests/codex_cli.py), all equal to the thread's UUID.
THREAD_HEADERS = ("session-id", "thread-id")


@pytest.fixture(scope="module")
def codex() -> str:
    binary = codex_binary()
    if binary is None:
        pytest.skip("npm not found: the Codex CLI (scripts/codex-cli) cannot be installed")
    return binary


def text_answers(d: Deployment) -> None:
    """The CLI always offers tools; the fake answers text anyway (``Hello from <account>.``)."""
    for name in NAMES:
        d.fake.configure(name, tool_calls=False)


@pytest.fixture(scope="module")
def dep(
    codex: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    """Round robin with sticky threads: without stickiness a conversation's next turn would go
    to the other account."""
    prefix = f"test:{uuid.uuid4().hex[:12]}:"
    data_dir = tmp_path_factory.mktemp("codex")
    with deployment(
        redis_url,
        prefix,
        data_dir,
        NAMES,
        routing_strategy="round_robin",
        sticky_threads_enabled=True,
    ) as d:
        text_answers(d)
        yield d


def base_url(d: Deployment) -> str:
    return f"{d.url}/backend-api/codex"


def answered(result: codex_cli.CodexResult) -> str:
    """The account that answered a successful ``codex exec`` (its final message on stdout)."""
    assert result.returncode == 0, result.stderr
    match = HELLO.match(result.stdout.strip())
    assert match, (result.stdout, result.stderr)
    return match.group(1)


def turns(d: Deployment, since: int) -> list[dict[str, Any]]:
    return d.fake.requests(since=since, path="/codex/responses")


def test_exec_then_resume_stays_on_one_account(codex: str, dep: Deployment, tmp_path: Path) -> None:
    since = dep.fake.last_seq()
    first = answered(run_codex(codex, base_url(dep), "say hello", tmp_path, dep.key))
    second = answered(run_codex(codex, base_url(dep), "and again", tmp_path, dep.key, resume=True))
    assert second == first

    one, two = turns(dep, since)
    assert one["account_id"] == two["account_id"] == first
    thread = one["headers"]["session-id"]
    for turn in (one, two):
        headers = turn["headers"]
        # The pool account's token upstream, never the client's key.
        assert dep.key not in headers["authorization"]
        assert headers["chatgpt-account-id"] == first
        assert all(headers[name] == thread for name in THREAD_HEADERS)
        assert turn["json"]["prompt_cache_key"] == thread
        assert turn["status"] == 200
    # The second turn is the resumed thread: the first answer goes back up as history.
    history = [i for i in two["json"]["input"] if i.get("role") == "assistant"]
    assert history[0]["content"][0]["text"] == f"Hello from {first}."


def test_new_conversations_spread_over_the_pool_and_each_stays_put(
    codex: str, dep: Deployment, tmp_path: Path
) -> None:
    homes = [tmp_path / f"conversation-{i}" for i in range(4)]
    since = dep.fake.last_seq()
    started = [answered(run_codex(codex, base_url(dep), "hi", h, dep.key)) for h in homes]
    # Round robin hands each new conversation to the next account.
    assert Counter(started) == {"acct-x": 2, "acct-y": 2}, started
    # Two more turns each, back to back: round robin alone would alternate them.
    for home, account in zip(homes, started, strict=True):
        for _ in range(2):
            resumed = run_codex(codex, base_url(dep), "more", home, dep.key, resume=True)
            assert answered(resumed) == account
    # Upstream: each thread id went out on one account only, on all of its three turns.
    accounts_of: dict[str, set[str]] = {}
    for turn in turns(dep, since):
        accounts_of.setdefault(turn["headers"]["session-id"], set()).add(turn["account_id"])
    assert len(accounts_of) == 4
    assert all(len(accounts) == 1 for accounts in accounts_of.values()), accounts_of
    assert sorted(a for accounts in accounts_of.values() for a in accounts) == sorted(started)


def test_the_readme_config_works_as_written_and_contacts_nothing_else(
    codex: str, dep: Deployment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README.md's config.toml, pointed at this process, with ``--strict-config`` (an unknown
    key is an error). Every connection the CLI tries to a host other than codex-lb goes to a
    recorder standing in as its HTTPS proxy: there must be none. Without the README's
    switches (the control), the same CLI tries several."""
    documented = code_block("toml")
    config = tomllib.loads(documented)
    provider = config["model_providers"][config["model_provider"]]
    assert provider["base_url"] == "http://127.0.0.1:2455/backend-api/codex"
    assert provider["wire_api"] == "responses"
    env_key = provider["env_key"]
    written = pointed_at(documented, dep.url)
    monkeypatch.setattr(codex_cli, "config_toml", lambda *args, **kwargs: written)

    with ConnectRecorder() as recorder:
        env = {**recorder.env, env_key: dep.key}
        since = dep.fake.last_seq()
        first = answered(run_codex(codex, "unused", "hi", tmp_path, None, env=env))
        again = answered(run_codex(codex, "unused", "more", tmp_path, None, env=env, resume=True))
        assert again == first
        assert [t["account_id"] for t in turns(dep, since)] == [first, first]
        time.sleep(0.5)  # anything still on its way out
        assert recorder.targets == []

        # The control: the provider alone (no update check, analytics, feedback, otel or
        # plugins switches) reaches out; so the recorder sees what the CLI tries.
        name = config["model_provider"]
        bare = "\n".join(
            [
                f'model_provider = "{name}"',
                f'[model_providers."{name}"]',
                *(f'{k} = "{v}"' for k, v in provider.items()),
            ]
        )
        bare = pointed_at(bare, dep.url)
        monkeypatch.setattr(codex_cli, "config_toml", lambda *args, **kwargs: bare)
        answered(run_codex(codex, "unused", "hi", tmp_path / "bare", None, env=env))
        deadline = time.monotonic() + 5
        while len(recorder.hosts()) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert recorder.hosts() == {"ab.chatgpt.com", "chatgpt.com", "github.com", "api.github.com"}


def try_again_at(resets_at: int, now: float) -> str:
    """The CLI's reset time (codex-rs ``format_retry_timestamp``), in the local zone (UTC
    here): "3:25 PM" today, else "Dec 6th, 2026 3:25 PM"."""
    reset = datetime.fromtimestamp(resets_at, UTC)
    clock = f"{reset.hour % 12 or 12}:{reset.minute:02d} {'AM' if reset.hour < 12 else 'PM'}"
    if reset.date() == datetime.fromtimestamp(now, UTC).date():
        return clock
    day = reset.day
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{reset:%b} {day}{suffix}, {reset.year} {clock}"


def test_every_account_limited_shows_the_clis_usage_limit_message(
    codex: str, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    """The proxy's 429 (``usage_limit_reached`` with the pool's earliest ``resets_at``) is the
    shape the CLI turns into its own message, with the reset time; its own deployment, since
    the accounts stay limited until then."""
    with deployment(redis_url, prefix, tmp_path / "data", NAMES) as d:
        text_answers(d)
        now = time.time()
        # Half past a minute, so a second either way shows the same time.
        earliest = int(now // 60 * 60) + 2 * 3600 + 30
        d.fake.configure("acct-x", fail=429, primary_reset_at=earliest + 3600)
        d.fake.configure("acct-y", fail=429, primary_reset_at=earliest)
        message = f"You\u2019ve hit your usage limit. Try again at {try_again_at(earliest, now)}."
        env = {"TZ": "UTC"}
        since = d.fake.last_seq()
        for resume in (False, True):
            # The first run meets the upstream's 429s, the resumed one the known limits.
            result = run_codex(
                codex, base_url(d), "hi", tmp_path / "cli", d.key, resume=resume, env=env
            )
            assert result.returncode == 1, (result.stdout, result.stderr)
            assert result.stdout == ""
            assert f"ERROR: {message}" in result.stderr.splitlines(), result.stderr
        # Each account was tried once, by the first run; the second never reached upstream.
        statuses = sorted((t["account_id"], t["status"]) for t in turns(d, since))
        assert statuses == [("acct-x", 429), ("acct-y", 429)]
