"""Helpers for proxy tests: a pool of accounts on the fake upstream, settings changes, and
reading which account served what."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx

from tests.conftest import AppHarness
from tests.fake_upstream import FakeUpstream

IMPORT = "/api/accounts/import"
RESPONSES = "/backend-api/codex/responses"


def body(text: str = "hi", **extra: Any) -> dict[str, Any]:
    """A Responses request like the Codex CLI's (fields the proxy must pass on untouched)."""
    return {
        "model": "gpt-5.1-codex",
        "instructions": "be brief",
        "input": [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
        ],
        "tools": [],
        "stream": True,
        "store": False,
        **extra,
    }


def import_files(fake: FakeUpstream, names: list[str]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [
        (
            "auth_json",
            (
                f"{name}.json",
                json.dumps(fake.auth_json(name, email=f"{name}@example.com", tag=name)).encode(),
                "application/json",
            ),
        )
        for name in names
    ]


def ids_by_name(reply: dict[str, Any]) -> dict[str, str]:
    """chatgpt account id -> our account id, from an import's reply."""
    return {r["account"]["chatgpt_account_id"]: r["account"]["id"] for r in reply["results"]}


def answered_by(text: str) -> str:
    """The fake's default answer names its account: ``Hello from <id>.``"""
    marker = "Hello from "
    start = text.index(marker) + len(marker)
    return text[start:].split(".")[0].split()[0]


def sse_text(raw: bytes) -> str:
    """The output text of a Responses SSE stream."""
    out = []
    for block in raw.split(b"\n\n"):
        for line in block.split(b"\n"):
            if line.startswith(b"data: "):
                try:
                    data = json.loads(line[6:])
                except ValueError:
                    continue
                if data.get("type") == "response.output_text.delta":
                    out.append(data["delta"])
    return "".join(out)


def event_names(raw: bytes) -> list[str]:
    return [
        line[7:].decode()
        for block in raw.split(b"\n\n")
        for line in block.split(b"\n")
        if line.startswith(b"event: ")
    ]


class Pool:
    """The app, logged in, with accounts imported; ``ids`` maps fake names to our ids."""

    def __init__(self, h: AppHarness, fake: FakeUpstream):
        self.h = h
        self.client = h.client
        self.fake = fake
        self.ids: dict[str, str] = {}

    async def add(self, *names: str) -> None:
        r = await self.client.post(IMPORT, files=import_files(self.fake, list(names)))
        assert r.status_code == 200, r.text
        self.ids.update(ids_by_name(r.json()))
        deadline = time.monotonic() + 3
        while not set(self.ids.values()) <= set(self.h.parts.accounts.accounts):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)

    async def settings(self, **changes: Any) -> None:
        current = (await self.client.get("/api/settings")).json()
        wanted = {
            k: current[k] for k in ("sticky_threads_enabled", "prefer_earlier_reset_accounts")
        }
        wanted.update(changes)
        r = await self.client.put("/api/settings", json=wanted)
        assert r.status_code == 200, r.text
        version = r.json()["version"]
        deadline = time.monotonic() + 3
        while (self.h.parts.settings.current or r).version < version:  # type: ignore[union-attr]
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)

    def name_of(self, account_id: str) -> str:
        return {v: k for k, v in self.ids.items()}[account_id]

    async def ask(self, **extra: Any) -> tuple[httpx.Response, str]:
        """One streamed Responses request; the response and the fake name that answered."""
        headers = extra.pop("headers", {})
        r = await self.client.post(RESPONSES, json=body(**extra), headers=headers)
        assert r.status_code == 200, r.text
        return r, answered_by(sse_text(r.content))
