"""/api/accounts against a real redis-server: import (both modes), list, lifecycle, tokens
encrypted at rest, the deployment's key fingerprint, and usage polling (wham/usage via respx)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import stat
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import respx
from cryptography.fernet import Fernet, InvalidToken

from service.config import Config
from service.core.bodies import rfc3339
from service.core.secret_box import KEY_FILE_NAME, SecretBox, load_key
from tests.conftest import AppHarness, make_config, setup_password
from tests.factories import AUTH_CLAIM, auth_json, jwt
from tests.support import ENCRYPTION_KEY, PASSWORD, ServeProcess, base_env, stored_blob

pytestmark = pytest.mark.timeout(60)

IMPORT = "/api/accounts/import"
UPSTREAM = "https://chatgpt.com/backend-api"
WHAM = f"{UPSTREAM}/wham/usage"
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
REQUIRED = {"sticky_threads_enabled": True, "prefer_earlier_reset_accounts": False}


# --- helpers (test_tokens imports some of these) ---------------------------------------------


def encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


Part = tuple[str, tuple[str, bytes, str]]


def parts(*docs: dict[str, Any] | bytes, names: Sequence[str] | None = None) -> list[Part]:
    """Multipart file parts named auth_json: ``auth-<i>.json`` unless ``names`` are given."""
    out = []
    for i, doc in enumerate(docs):
        name = names[i] if names else f"auth-{i}.json"
        content = doc if isinstance(doc, bytes) else encode(doc)
        out.append(("auth_json", (name, content, "application/json")))
    return out


async def import_docs(
    client: httpx.AsyncClient, *docs: dict[str, Any], names: Sequence[str] | None = None
) -> httpx.Response:
    return await client.post(IMPORT, files=parts(*docs, names=names))


def folder(n: int, **extra: Any) -> list[dict[str, Any]]:
    """n distinct identities, like a folder of auth.json files from n people."""
    return [
        auth_json(
            account_id=f"acct-{i}",
            email=f"person{i}@example.com",
            refresh_token=f"rt-secret-folder-{i}",
            tag=f"folder-{i}",
            **extra,
        )
        for i in range(n)
    ]


def tokens_of(doc: dict[str, Any]) -> dict[str, str]:
    t = doc["tokens"]
    return {
        "access_token": t.get("access_token", t.get("accessToken")),
        "refresh_token": t.get("refresh_token", t.get("refreshToken")),
        "id_token": t.get("id_token", t.get("idToken")),
    }


def secrets_of(*docs: dict[str, Any]) -> set[str]:
    """Every token of the documents, and each distinctive fragment of the JWTs."""
    out: set[str] = set()
    for doc in docs:
        for token in tokens_of(doc).values():
            out.add(token)
            if token.count(".") == 2:
                _header, payload, _signature = token.split(".")
                out.add(payload)
                out.add(payload[8:40])  # a fragment from the middle of the payload
    return out


def assert_no_secret(text: str | bytes, secrets: set[str], where: str) -> None:
    data = text if isinstance(text, bytes) else text.encode()
    leaked = sorted(s for s in secrets if s.encode() in data)
    assert not leaked, f"token material in {where}: {leaked}"


def prefix_keys(raw: redis.Redis, prefix: str) -> set[bytes]:
    return set(raw.scan_iter(match=f"{prefix}*", count=1000))


dump = stored_blob


def account_hash(raw: redis.Redis, prefix: str, account_id: str) -> dict[bytes, bytes]:
    return raw.hgetall(f"{prefix}account:{account_id}")


def opened(raw: redis.Redis, prefix: str, account_id: str) -> dict[str, Any]:
    """The stored tokens, decrypted here with the deployment's key."""
    sealed = account_hash(raw, prefix, account_id)[b"tokens"]
    assert sealed.startswith(b"gAAAAA"), sealed[:16]  # a Fernet token, not the clear text
    return json.loads(Fernet(ENCRYPTION_KEY.encode()).decrypt(sealed))


def index(raw: redis.Redis, prefix: str) -> set[str]:
    return {m.decode() for m in raw.smembers(f"{prefix}accounts")}


def accounts_version(raw: redis.Redis, prefix: str) -> bytes | None:
    return raw.get(f"{prefix}accounts:version")


def assert_error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"]["code"] == code, body
    return str(body["error"]["message"])


async def set_overwrite(client: httpx.AsyncClient, *, skip: bool) -> None:
    r = await client.put("/api/settings", json={**REQUIRED, "import_without_overwrite": skip})
    assert r.status_code == 200, r.text
    assert r.json()["import_without_overwrite"] is skip


async def login(client: httpx.AsyncClient) -> None:
    r = await client.post("/api/dashboard-auth/password/login", json={"password": PASSWORD})
    assert r.status_code == 200, r.text


async def wait_live(h: AppHarness, predicate: Any, timeout: float = 3.0) -> None:
    """Until this process's live copy of the accounts satisfies ``predicate(accounts)``."""
    deadline = time.monotonic() + timeout
    while not predicate(h.parts.accounts.accounts):
        assert time.monotonic() < deadline, "live account copy never caught up"
        await asyncio.sleep(0.01)


async def listed(client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    r = await client.get("/api/accounts")
    assert r.status_code == 200, r.text
    return {a["id"]: a for a in r.json()["accounts"]}


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    return caplog


# --- import: create, update, skip ---------------------------------------------------------------


async def test_import_creates_accounts_with_sealed_tokens(
    admin: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str, logs: pytest.LogCaptureFixture
) -> None:
    docs = [
        auth_json(account_id="acct-a", email="a@example.com", plan="pro", tag="a"),
        auth_json(account_id="acct-b", email="b@example.com", plan="team", tag="b"),
    ]
    r = await import_docs(admin, *docs, names=["alice.json", "bob.json"])
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["filename"] for x in results] == ["alice.json", "bob.json"]
    assert [x["status"] for x in results] == ["created", "created"]
    a, b = (x["account"] for x in results)
    assert set(a) == {
        "id",
        "chatgpt_account_id",
        "email",
        "plan_type",
        "status",
        "primary_used_percent",
        "primary_reset_at",
        "secondary_used_percent",
        "secondary_reset_at",
        "last_used_at",
    }
    assert (a["chatgpt_account_id"], a["email"], a["plan_type"]) == (
        "acct-a",
        "a@example.com",
        "pro",
    )
    assert (b["chatgpt_account_id"], b["plan_type"], b["status"]) == ("acct-b", "team", "active")
    assert a["primary_used_percent"] is None
    assert a["secondary_reset_at"] is None
    assert a["id"] != b["id"]

    assert index(raw_redis, prefix) == {a["id"], b["id"]}
    for doc, acc in zip(docs, (a, b), strict=True):
        stored = account_hash(raw_redis, prefix, acc["id"])
        assert stored[b"status"] == b"active"
        assert stored[b"tokens_version"] == b"1"
        assert stored[b"chatgpt_account_id"] == acc["chatgpt_account_id"].encode()
        sealed = opened(raw_redis, prefix, acc["id"])
        assert {k: sealed[k] for k in ("access_token", "refresh_token", "id_token")} == tokens_of(
            doc
        )
    secrets = secrets_of(*docs)
    assert_no_secret(r.text, secrets, "the import response")
    assert_no_secret(dump(raw_redis, prefix), secrets, "Redis")
    assert_no_secret(logs.text, secrets, "the log")

    listing = await listed(admin)
    assert set(listing) == {a["id"], b["id"]}
    assert listing[a["id"]] == a


@pytest.mark.parametrize("skip", [False, True], ids=["overwrite", "without_overwrite"])
async def test_reimporting_the_same_folder_twice_never_duplicates(
    admin: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str, skip: bool
) -> None:
    await set_overwrite(admin, skip=skip)
    docs = folder(5)
    names = [f"person{i}/auth.json" for i in range(5)]

    first = await import_docs(admin, *docs, names=names)
    assert first.status_code == 200, first.text
    assert [x["status"] for x in first.json()["results"]] == ["created"] * 5
    ids = [x["account"]["id"] for x in first.json()["results"]]
    assert len(set(ids)) == 5
    assert index(raw_redis, prefix) == set(ids)
    before = {i: account_hash(raw_redis, prefix, i) for i in ids}
    version_before = accounts_version(raw_redis, prefix)

    second = await import_docs(admin, *docs, names=names)
    assert second.status_code == 200, second.text
    results = second.json()["results"]
    assert [x["filename"] for x in results] == names
    assert [x["status"] for x in results] == ["skipped" if skip else "updated"] * 5
    assert [x["account"]["id"] for x in results] == ids
    assert index(raw_redis, prefix) == set(ids)
    assert len(await listed(admin)) == 5
    assert raw_redis.scard(f"{prefix}accounts") == 5
    assert len([k for k in prefix_keys(raw_redis, prefix) if b":account:" in k]) == 5

    after = {i: account_hash(raw_redis, prefix, i) for i in ids}
    if skip:
        assert after == before  # byte for byte: tokens, status, usage, versions
        assert accounts_version(raw_redis, prefix) == version_before
    else:
        for i, doc in zip(ids, docs, strict=True):
            assert after[i][b"tokens_version"] == b"2"
            unchanged = {
                k: v for k, v in after[i].items() if k not in (b"tokens", b"tokens_version")
            }
            assert unchanged == {
                k: v for k, v in before[i].items() if k not in (b"tokens", b"tokens_version")
            }
            sealed = opened(raw_redis, prefix, i)
            assert sealed["refresh_token"] == tokens_of(doc)["refresh_token"]


async def test_overwrite_replaces_tokens_but_keeps_status_and_usage(
    admin: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str
) -> None:
    old = auth_json(refresh_token="rt-old", tag="old")
    new = auth_json(refresh_token="rt-new", tag="new", plan="pro")
    r = await import_docs(admin, old)
    account_id = r.json()["results"][0]["account"]["id"]
    assert (await admin.post(f"/api/accounts/{account_id}/pause")).status_code == 200
    usage = b'{"primary_used_percent":40.0}'
    raw_redis.hset(f"{prefix}account:{account_id}", "usage", usage)

    r = await import_docs(admin, new, names=["again.json"])
    assert r.status_code == 200, r.text
    (result,) = r.json()["results"]
    assert (result["filename"], result["status"]) == ("again.json", "updated")
    assert result["account"]["id"] == account_id
    assert result["account"]["status"] == "paused"
    assert result["account"]["plan_type"] == "pro"
    stored = account_hash(raw_redis, prefix, account_id)
    assert stored[b"status"] == b"paused"
    assert stored[b"usage"] == usage
    assert stored[b"tokens_version"] == b"2"
    sealed = opened(raw_redis, prefix, account_id)
    assert {k: sealed[k] for k in ("access_token", "refresh_token", "id_token")} == tokens_of(new)


async def test_without_overwrite_leaves_a_changed_file_untouched(
    admin: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str
) -> None:
    old = auth_json(refresh_token="rt-old", tag="old")
    r = await import_docs(admin, old)
    account_id = r.json()["results"][0]["account"]["id"]
    raw_redis.hset(f"{prefix}account:{account_id}", "usage", b'{"primary_used_percent":7.0}')
    await set_overwrite(admin, skip=True)
    before = account_hash(raw_redis, prefix, account_id)
    version_before = accounts_version(raw_redis, prefix)

    newer = auth_json(refresh_token="rt-new", tag="new", plan="pro")
    r = await import_docs(admin, newer, auth_json(account_id="acct-2", email="other@example.com"))
    assert r.status_code == 200, r.text
    assert [x["status"] for x in r.json()["results"]] == ["skipped", "created"]
    assert r.json()["results"][0]["account"]["plan_type"] == "plus"
    assert account_hash(raw_redis, prefix, account_id) == before
    assert opened(raw_redis, prefix, account_id)["refresh_token"] == "rt-old"
    assert int(accounts_version(raw_redis, prefix) or 0) == int(version_before or 0) + 1
    assert len(index(raw_redis, prefix)) == 2


@pytest.mark.parametrize("skip", [False, True], ids=["overwrite", "without_overwrite"])
async def test_email_is_case_insensitive(
    admin: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str, skip: bool
) -> None:
    await set_overwrite(admin, skip=skip)
    upper = auth_json(email="USER@Example.COM", refresh_token="rt-upper", tag="u")
    lower = auth_json(email="user@example.com", refresh_token="rt-lower", tag="l")
    r1 = await import_docs(admin, upper, names=["upper.json"])
    r2 = await import_docs(admin, lower, names=["lower.json"])
    assert r1.status_code == r2.status_code == 200
    a, b = r1.json()["results"][0], r2.json()["results"][0]
    assert a["status"] == "created"
    assert b["status"] == ("skipped" if skip else "updated")
    assert a["account"]["id"] == b["account"]["id"]
    assert a["account"]["email"].lower() == "user@example.com"
    assert len(index(raw_redis, prefix)) == 1
    expected = "rt-upper" if skip else "rt-lower"
    assert opened(raw_redis, prefix, a["account"]["id"])["refresh_token"] == expected

    # Both spellings in one request are one identity, too.
    r = await import_docs(admin, upper, lower)
    assert r.status_code == 200
    assert [x["status"] for x in r.json()["results"]] == ["skipped" if skip else "updated"] * 2
    assert len(index(raw_redis, prefix)) == 1


async def test_same_account_id_different_emails_are_two_accounts(
    admin: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str
) -> None:
    docs = [
        auth_json(account_id="ws-1", email="ann@example.com", tag="ann"),
        auth_json(account_id="ws-1", email="ben@example.com", tag="ben"),
    ]
    r = await import_docs(admin, *docs)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["status"] for x in results] == ["created", "created"]
    ids = {x["account"]["id"] for x in results}
    assert len(ids) == 2
    assert index(raw_redis, prefix) == ids
    assert {x["account"]["chatgpt_account_id"] for x in results} == {"ws-1"}
    assert {x["account"]["email"] for x in results} == {"ann@example.com", "ben@example.com"}


@pytest.mark.parametrize("in_tokens", [True, False], ids=["accountId", "from_id_token"])
async def test_camel_case_fields(
    admin: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str, in_tokens: bool
) -> None:
    doc = auth_json(account_id="acct-camel", camel=True, account_id_in_tokens=in_tokens)
    assert "idToken" in doc["tokens"]
    assert "id_token" not in doc["tokens"]
    r = await import_docs(admin, doc, names=["camel.json"])
    assert r.status_code == 200, r.text
    (result,) = r.json()["results"]
    assert result["status"] == "created"
    assert result["account"]["chatgpt_account_id"] == "acct-camel"
    sealed = opened(raw_redis, prefix, result["account"]["id"])
    assert {k: sealed[k] for k in ("access_token", "refresh_token", "id_token")} == tokens_of(doc)

    # The same identity in snake_case is the same account.
    r = await import_docs(admin, auth_json(account_id="acct-camel"))
    assert r.json()["results"][0]["status"] == "updated"
    assert r.json()["results"][0]["account"]["id"] == result["account"]["id"]
    assert len(index(raw_redis, prefix)) == 1


async def test_account_id_falls_back_to_the_id_token(
    admin: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str
) -> None:
    r = await import_docs(admin, auth_json(account_id="acct-claim", account_id_in_tokens=False))
    assert r.status_code == 200, r.text
    account = r.json()["results"][0]["account"]
    assert account["chatgpt_account_id"] == "acct-claim"
    assert account_hash(raw_redis, prefix, account["id"])[b"chatgpt_account_id"] == b"acct-claim"


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8"])
async def test_json_body_import(
    admin: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str, content_type: str
) -> None:
    doc = auth_json(account_id="acct-json", email="json@example.com")
    r = await admin.post(IMPORT, content=encode(doc), headers={"Content-Type": content_type})
    assert r.status_code == 200, r.text
    (result,) = r.json()["results"]
    assert result["filename"] == "auth.json"
    assert result["status"] == "created"
    assert result["account"]["email"] == "json@example.com"
    assert index(raw_redis, prefix) == {result["account"]["id"]}
    assert (
        opened(raw_redis, prefix, result["account"]["id"])["id_token"] == tokens_of(doc)["id_token"]
    )
    r = await admin.post(IMPORT, json=doc)
    assert r.json()["results"][0]["status"] == "updated"
    assert len(index(raw_redis, prefix)) == 1


async def test_concurrent_imports_of_one_folder_on_two_replicas(
    harness: AppHarness,
    admin: httpx.AsyncClient,
    config: Config,
    raw_redis: redis.Redis,
    prefix: str,
) -> None:
    docs = folder(6)
    async with AppHarness(config) as other:
        await login(other.client)
        r1, r2 = await asyncio.gather(import_docs(admin, *docs), import_docs(other.client, *docs))
    assert r1.status_code == r2.status_code == 200
    statuses = [x["status"] for r in (r1, r2) for x in r.json()["results"]]
    assert statuses.count("created") == 6
    assert statuses.count("updated") == 6
    assert len(index(raw_redis, prefix)) == 6


async def test_flipping_the_setting_on_one_replica_applies_to_the_next_import_on_another(
    harness: AppHarness,
    admin: httpx.AsyncClient,
    config: Config,
    raw_redis: redis.Redis,
    prefix: str,
) -> None:
    docs = folder(3)
    async with AppHarness(config) as b:
        await login(b.client)
        r = await import_docs(b.client, *docs)
        assert [x["status"] for x in r.json()["results"]] == ["created"] * 3
        ids = [x["account"]["id"] for x in r.json()["results"]]

        for skip in (True, False, True):
            r = await admin.put(
                "/api/settings?wait=true", json={**REQUIRED, "import_without_overwrite": skip}
            )
            assert r.status_code == 200, r.text
            assert r.headers["x-propagation"] == "2/2"
            before = {i: account_hash(raw_redis, prefix, i) for i in ids}
            r = await import_docs(b.client, *docs)
            assert r.status_code == 200, r.text
            assert [x["status"] for x in r.json()["results"]] == [
                "skipped" if skip else "updated"
            ] * 3
            after = {i: account_hash(raw_redis, prefix, i) for i in ids}
            assert (after == before) is skip
        assert len(index(raw_redis, prefix)) == 3


# --- bad input --------------------------------------------------------------------------------


def _doc_without(field: str) -> dict[str, Any]:
    doc = auth_json()
    del doc["tokens"][field]
    return doc


def _doc_with(field: str, value: Any) -> dict[str, Any]:
    doc = auth_json()
    doc["tokens"][field] = value
    return doc


_NO_ACCOUNT = auth_json(account_id_in_tokens=False)
_NO_ACCOUNT["tokens"]["id_token"] = jwt({"email": "x@example.com", AUTH_CLAIM: {}})
_NO_EMAIL = auth_json()
_NO_EMAIL["tokens"]["id_token"] = jwt({AUTH_CLAIM: {"chatgpt_account_id": "acct-1"}})

BAD_DOCUMENTS: dict[str, bytes] = {
    "not_json": b'{"tokens": {',
    "not_utf8": b'{"tokens": "\xff\xfe"}',
    "not_an_object": b"[1, 2, 3]",
    "empty": b"",
    "no_tokens": encode({"OPENAI_API_KEY": None, "last_refresh": "2026-11-20T10:00:00Z"}),
    "tokens_not_object": encode({"tokens": "abc"}),
    "no_id_token": encode(_doc_without("id_token")),
    "no_access_token": encode(_doc_without("access_token")),
    "no_refresh_token": encode(_doc_without("refresh_token")),
    "blank_refresh_token": encode(_doc_with("refresh_token", "  ")),
    "numeric_access_token": encode(_doc_with("access_token", 12345)),
    "id_token_not_jwt": encode(_doc_with("id_token", "not-a-jwt")),
    "id_token_bad_payload": encode(_doc_with("id_token", "aGVhZA.!!!notbase64!!!.c2ln")),
    "no_account_id": encode(_NO_ACCOUNT),
    "no_email": encode(_NO_EMAIL),
}


async def _assert_nothing_written(
    raw: redis.Redis, prefix: str, keys: set[bytes], version: bytes | None
) -> None:
    assert prefix_keys(raw, prefix) == keys
    assert accounts_version(raw, prefix) == version
    assert index(raw, prefix) == set()


@pytest.mark.parametrize("case", list(BAD_DOCUMENTS))
async def test_bad_file_fails_the_whole_request_naming_it(
    admin: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str, case: str
) -> None:
    keys, version = prefix_keys(raw_redis, prefix), accounts_version(raw_redis, prefix)
    filename = f"bad-{case}.json"
    r = await admin.post(
        IMPORT,
        files=parts(auth_json(account_id="good"), BAD_DOCUMENTS[case], names=["ok.json", filename]),
    )
    message = assert_error(r, 400, "invalid_auth_json")
    assert filename in message
    assert "ok.json" not in message
    await _assert_nothing_written(raw_redis, prefix, keys, version)

    # The same document alone as a JSON body: named as auth.json.
    r = await admin.post(
        IMPORT, content=BAD_DOCUMENTS[case], headers={"Content-Type": "application/json"}
    )
    message = assert_error(r, 400, "invalid_auth_json")
    assert "auth.json" in message
    await _assert_nothing_written(raw_redis, prefix, keys, version)
    assert_no_secret(r.text + message, secrets_of(auth_json()), "an error message")


async def test_bad_input_messages_say_what_is_wrong(admin: httpx.AsyncClient) -> None:
    expected = {
        "not_json": "JSON",
        "not_utf8": "UTF-8",
        "no_tokens": "tokens",
        "no_id_token": "id_token",
        "no_access_token": "access_token",
        "no_refresh_token": "refresh_token",
        "id_token_not_jwt": "JWT",
    }
    for case, word in expected.items():
        r = await admin.post(IMPORT, files=parts(BAD_DOCUMENTS[case], names=[f"{case}.json"]))
        message = assert_error(r, 400, "invalid_auth_json")
        assert f"{case}.json" in message, message
        assert word in message, (case, message)


def _multipart(body_parts: list[tuple[str, str | None, bytes]]) -> tuple[bytes, dict[str, str]]:
    boundary = "codexlbtestboundary"
    chunks = []
    for name, filename, content in body_parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        chunks.append(
            f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
            + content
            + b"\r\n"
        )
    body = b"".join(chunks) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


async def test_zero_files_is_refused(
    admin: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str
) -> None:
    keys, version = prefix_keys(raw_redis, prefix), accounts_version(raw_redis, prefix)
    body, headers = _multipart([])
    r = await admin.post(IMPORT, content=body, headers=headers)
    message = assert_error(r, 400, "invalid_auth_json")
    assert "auth_json" in message
    await _assert_nothing_written(raw_redis, prefix, keys, version)


@pytest.mark.parametrize("with_good_file", [False, True])
async def test_a_part_with_another_name_is_refused(
    admin: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str, with_good_file: bool
) -> None:
    keys, version = prefix_keys(raw_redis, prefix), accounts_version(raw_redis, prefix)
    good = [("auth_json", "good.json", encode(auth_json()))] if with_good_file else []
    body, headers = _multipart([*good, ("file", "stray.json", encode(auth_json(tag="x")))])
    r = await admin.post(IMPORT, content=body, headers=headers)
    message = assert_error(r, 400, "invalid_auth_json")
    assert "stray.json" in message
    await _assert_nothing_written(raw_redis, prefix, keys, version)

    # A plain (non-file) field with another name, too.
    body, headers = _multipart([*good, ("note", None, b"hello")])
    r = await admin.post(IMPORT, content=body, headers=headers)
    assert "note" in assert_error(r, 400, "invalid_auth_json")
    await _assert_nothing_written(raw_redis, prefix, keys, version)


def _padded(doc: dict[str, Any], size: int) -> bytes:
    raw = encode(doc)
    return raw[:-1] + b" " * (size - len(raw)) + b"}"


async def test_file_over_1_mib_is_413_and_exactly_1_mib_is_accepted(
    admin: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str
) -> None:
    keys, version = prefix_keys(raw_redis, prefix), accounts_version(raw_redis, prefix)
    mib = 1024 * 1024
    big = _padded(auth_json(account_id="big"), mib + 1)
    assert len(big) == mib + 1
    assert json.loads(big)
    r = await admin.post(
        IMPORT, files=parts(auth_json(), big, names=["small.json", "huge-auth.json"])
    )
    message = assert_error(r, 413, "payload_too_large")
    assert "huge-auth.json" in message
    await _assert_nothing_written(raw_redis, prefix, keys, version)

    # The same oversize document as a plain form field, and as a JSON body.
    body, headers = _multipart([("auth_json", None, big)])
    assert_error(await admin.post(IMPORT, content=body, headers=headers), 413, "payload_too_large")
    await _assert_nothing_written(raw_redis, prefix, keys, version)
    r = await admin.post(IMPORT, content=big, headers={"Content-Type": "application/json"})
    assert "auth.json" in assert_error(r, 413, "payload_too_large")
    await _assert_nothing_written(raw_redis, prefix, keys, version)

    exact = _padded(auth_json(account_id="exact"), mib)
    r = await admin.post(IMPORT, files=parts(exact, names=["exact.json"]))
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["status"] == "created"
    assert len(index(raw_redis, prefix)) == 1


@pytest.mark.parametrize("content_type", ["text/plain", None, "application/x-www-form-urlencoded"])
async def test_other_content_types_are_415(
    admin: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str, content_type: str | None
) -> None:
    keys, version = prefix_keys(raw_redis, prefix), accounts_version(raw_redis, prefix)
    headers = {"Content-Type": content_type} if content_type else {}
    r = await admin.post(IMPORT, content=encode(auth_json()), headers=headers)
    assert_error(r, 415, "unsupported_media_type")
    await _assert_nothing_written(raw_redis, prefix, keys, version)


async def test_routes_need_a_session_and_same_origin(
    harness: AppHarness, raw_redis: redis.Redis, prefix: str
) -> None:
    client = harness.client
    for method, path in [
        ("GET", "/api/accounts"),
        ("POST", IMPORT),
        ("POST", "/api/accounts/acc_x/pause"),
        ("POST", "/api/accounts/acc_x/resume"),
        ("DELETE", "/api/accounts/acc_x"),
    ]:
        r = await client.request(method, path)
        assert r.status_code == 401, (path, r.text)
    await setup_password(client)
    r = await client.post(
        IMPORT, files=parts(auth_json()), headers={"Origin": "https://evil.example"}
    )
    assert_error(r, 403, "csrf_rejected")
    assert index(raw_redis, prefix) == set()


# --- list and lifecycle --------------------------------------------------------------------------


async def test_list_never_shows_a_token(
    admin: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str, logs: pytest.LogCaptureFixture
) -> None:
    docs = [*folder(3), auth_json(camel=True, account_id="camel", email="c@example.com")]
    pubsub = raw_redis.pubsub()
    pubsub.subscribe(f"{prefix}ch:accounts")
    r = await import_docs(admin, *docs)
    assert r.status_code == 200
    ids = [x["account"]["id"] for x in r.json()["results"]]
    assert (await admin.post(f"/api/accounts/{ids[0]}/pause")).status_code == 200
    assert (await admin.post(f"/api/accounts/{ids[0]}/resume")).status_code == 200
    secrets = secrets_of(*docs)

    r = await admin.get("/api/accounts")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    assert len(r.json()["accounts"]) == 4
    for account in r.json()["accounts"]:
        assert not {k for k in account if "token" in k}
    assert_no_secret(r.text, secrets, "GET /api/accounts")
    assert_no_secret(dump(raw_redis, prefix), secrets, "Redis")
    messages = []
    while (m := pubsub.get_message(timeout=0.2)) is not None:
        messages.append(m["data"] if isinstance(m["data"], bytes) else str(m["data"]).encode())
    pubsub.close()
    assert len(messages) >= 3  # subscribe confirmation, the import, the pause, the resume
    assert_no_secret(b"\n".join(messages), secrets, "the accounts channel")
    assert_no_secret(logs.text, secrets, "the log")


async def test_list_is_sorted_by_creation(admin: httpx.AsyncClient) -> None:
    r1 = await import_docs(admin, auth_json(account_id="first", email="1@example.com"))
    await asyncio.sleep(0.01)
    r2 = await import_docs(admin, auth_json(account_id="second", email="2@example.com"))
    r = await admin.get("/api/accounts")
    assert [a["id"] for a in r.json()["accounts"]] == [
        r1.json()["results"][0]["account"]["id"],
        r2.json()["results"][0]["account"]["id"],
    ]


async def test_pause_resume_delete(
    harness: AppHarness, admin: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str
) -> None:
    r = await import_docs(admin, *folder(2))
    keep, gone = (x["account"]["id"] for x in r.json()["results"])
    key = f"{prefix}account:{keep}"

    r = await admin.post(f"/api/accounts/{keep}/pause")
    assert r.status_code == 200, r.text
    assert (r.json()["id"], r.json()["status"]) == (keep, "paused")
    assert raw_redis.hget(key, "status") == b"paused"
    assert (await listed(admin))[keep]["status"] == "paused"
    await wait_live(harness, lambda a: a[keep].status == "paused")
    assert keep not in {a.id for a in harness.parts.accounts.serving()}
    # Pausing twice is harmless.
    assert (await admin.post(f"/api/accounts/{keep}/pause")).json()["status"] == "paused"

    r = await admin.post(f"/api/accounts/{keep}/resume")
    assert r.status_code == 200
    assert r.json()["status"] == "active"
    assert raw_redis.hget(key, "status") == b"active"

    # Resume only lifts a pause: an account that must be re-imported stays that way.
    raw_redis.hset(key, "status", "reauth_required")
    r = await admin.post(f"/api/accounts/{keep}/resume")
    assert r.status_code == 200
    assert r.json()["status"] == "reauth_required"
    assert raw_redis.hget(key, "status") == b"reauth_required"

    tokens_before = raw_redis.hget(key, "tokens")
    r = await admin.delete(f"/api/accounts/{gone}")
    assert r.status_code == 204
    assert r.content == b""
    assert not raw_redis.exists(f"{prefix}account:{gone}")
    assert index(raw_redis, prefix) == {keep}
    assert set(await listed(admin)) == {keep}
    assert raw_redis.hget(key, "tokens") == tokens_before
    await wait_live(harness, lambda a: gone not in a)

    for method, path in [
        ("POST", f"/api/accounts/{gone}/pause"),
        ("POST", f"/api/accounts/{gone}/resume"),
        ("DELETE", f"/api/accounts/{gone}"),
        ("POST", "/api/accounts/acc_doesnotexist/pause"),
        ("POST", "/api/accounts/acc_doesnotexist/resume"),
        ("DELETE", "/api/accounts/acc_doesnotexist"),
    ]:
        assert_error(await admin.request(method, path), 404, "not_found")
    assert not raw_redis.exists(f"{prefix}account:{gone}")
    assert not raw_redis.exists(f"{prefix}account:acc_doesnotexist")
    assert index(raw_redis, prefix) == {keep}

    # Deleted, then imported again: a new account with the same stable id.
    r = await import_docs(admin, folder(2)[1])
    assert r.json()["results"][0]["status"] == "created"
    assert r.json()["results"][0]["account"]["id"] == gone


async def test_reimport_in_overwrite_mode_revives_a_reauth_required_account(
    admin: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str
) -> None:
    r = await import_docs(admin, auth_json())
    account_id = r.json()["results"][0]["account"]["id"]
    raw_redis.hset(f"{prefix}account:{account_id}", "status", "reauth_required")
    r = await import_docs(admin, auth_json(refresh_token="rt-fresh", tag="fresh"))
    assert r.json()["results"][0]["status"] == "updated"
    assert r.json()["results"][0]["account"]["status"] == "active"
    assert raw_redis.hget(f"{prefix}account:{account_id}", "status") == b"active"
    assert opened(raw_redis, prefix, account_id)["refresh_token"] == "rt-fresh"


# --- the encryption key ------------------------------------------------------------------------


async def test_tokens_are_sealed_with_the_configured_key(
    harness: AppHarness, admin: httpx.AsyncClient, raw_redis: redis.Redis, prefix: str
) -> None:
    r = await import_docs(admin, auth_json())
    account_id = r.json()["results"][0]["account"]["id"]
    sealed = account_hash(raw_redis, prefix, account_id)[b"tokens"]
    with pytest.raises(InvalidToken):
        Fernet(Fernet.generate_key()).decrypt(sealed)
    assert opened(raw_redis, prefix, account_id)["refresh_token"] == "rt-secret-1"
    fingerprint = raw_redis.get(f"{prefix}meta:key_fingerprint")
    assert fingerprint == SecretBox(ENCRYPTION_KEY.encode()).fingerprint.encode()
    assert ENCRYPTION_KEY.encode() not in dump(raw_redis, prefix)


def test_a_key_is_generated_into_the_data_dir_once(tmp_path: Path) -> None:
    config = Config(data_dir=tmp_path / "data")
    key = load_key(config)
    path = tmp_path / "data" / KEY_FILE_NAME
    assert path.read_bytes().strip() == key
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_key(config) == key
    box = SecretBox(key)
    assert box.open(box.seal("x")) == "x"
    key_file = tmp_path / "k"
    key_file.write_bytes(ENCRYPTION_KEY.encode() + b"\n")
    assert load_key(Config(data_dir=tmp_path, encryption_key_file=key_file)) == (
        ENCRYPTION_KEY.encode()
    )


@pytest.mark.parametrize("via", ["env", "file"])
async def test_a_process_with_another_key_refuses_to_start(
    harness: AppHarness,
    raw_redis: redis.Redis,
    redis_url: str,
    prefix: str,
    tmp_path: Path,
    via: str,
) -> None:
    fingerprint_key = f"{prefix}meta:key_fingerprint"
    deadline = time.monotonic() + 5
    while not raw_redis.exists(fingerprint_key):
        assert time.monotonic() < deadline, "the deployment's key fingerprint was never stored"
        await asyncio.sleep(0.02)
    fingerprint = raw_redis.get(fingerprint_key)
    other_key = Fernet.generate_key().decode()
    env = base_env(redis_url, prefix, tmp_path / "other")
    if via == "env":
        env["CODEX_LB_ENCRYPTION_KEY"] = other_key
    else:
        del env["CODEX_LB_ENCRYPTION_KEY"]
        key_file = tmp_path / "other.key"
        key_file.write_text(other_key)
        env["CODEX_LB_ENCRYPTION_KEY_FILE"] = str(key_file)
    proc = ServeProcess(env, log_dir=tmp_path)
    try:
        code = await asyncio.to_thread(proc.proc.wait, 30)
    finally:
        proc.terminate()
    log = proc.log()
    assert code != 0, log
    assert "CODEX_LB_ENCRYPTION_KEY" in log
    assert "listening" not in log
    assert other_key not in log
    assert ENCRYPTION_KEY not in log
    assert raw_redis.get(fingerprint_key) == fingerprint


# --- usage polling --------------------------------------------------------------------------------


def wham(
    primary: float,
    secondary: float,
    *,
    limit_reached: bool = False,
    primary_reset: float | None = 1_900_000_000,
    secondary_reset: float | None = 1_900_500_000,
) -> dict[str, Any]:
    def window(used: float, seconds: int, reset: float | None) -> dict[str, Any]:
        w: dict[str, Any] = {"used_percent": used, "limit_window_seconds": seconds}
        if reset is None:
            w["reset_after_seconds"] = 9000
        else:
            w["reset_at"] = reset
        return w

    return {
        "plan_type": "plus",
        "rate_limit": {
            "allowed": not limit_reached,
            "limit_reached": limit_reached,
            "primary_window": window(primary, 18000, primary_reset),
            "secondary_window": window(secondary, 604800, secondary_reset),
        },
        "credits": {"has_credits": False, "unlimited": False, "balance": "0"},
    }


def epoch(value: str) -> float:
    assert RFC3339.match(value), value
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC).timestamp()


async def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition never met"
        await asyncio.sleep(0.05)


async def test_usage_poll_stores_windows_and_maps_limits_to_statuses(
    redis_url: str,
    prefix: str,
    tmp_path: Path,
    raw_redis: redis.Redis,
    logs: pytest.LogCaptureFixture,
) -> None:
    docs = {
        name: auth_json(account_id=f"acct-{name}", email=f"{name}@example.com", tag=name)
        for name in ("ok", "limited", "full5h", "weekly", "paused", "reauth")
    }
    replies = {
        "acct-ok": wham(12.5, 30, primary_reset=None),
        "acct-limited": wham(80, 40, limit_reached=True),
        "acct-full5h": wham(100, 40),
        "acct-weekly": wham(20, 100),
        "acct-paused": wham(1, 1),
        "acct-reauth": wham(1, 1),
    }
    calls: list[tuple[str, str]] = []

    def usage(request: httpx.Request) -> httpx.Response:
        account = request.headers["chatgpt-account-id"]
        calls.append((account, request.headers["authorization"]))
        if account in ("acct-paused", "acct-reauth"):
            return httpx.Response(503)  # polled before the pause landed: store nothing
        return httpx.Response(200, json=replies[account])

    config = make_config(redis_url, prefix, tmp_path, usage_poll_seconds=0.2)
    with respx.mock(assert_all_called=False) as mock:
        mock.get(WHAM).mock(side_effect=usage)
        mock.post("https://auth.openai.com/oauth/token").respond(500)
        async with AppHarness(config) as h:
            await setup_password(h.client)
            # Pause and mark one before importing the others, so neither is ever polled.
            r = await import_docs(h.client, docs["paused"], docs["reauth"])
            paused_id, reauth_id = (x["account"]["id"] for x in r.json()["results"])
            assert (await h.client.post(f"/api/accounts/{paused_id}/pause")).status_code == 200
            await h.parts.account_store.update(reauth_id, {"status": "reauth_required"})
            await wait_live(
                h,
                lambda a: (
                    (a[reauth_id].status, a[paused_id].status) == ("reauth_required", "paused")
                ),
            )
            await asyncio.sleep(0.3)  # a poll that began before both changes has ended
            calls.clear()
            names = ["ok", "limited", "full5h", "weekly"]
            r = await import_docs(h.client, *(docs[n] for n in names))
            ids = dict(zip(names, (x["account"]["id"] for x in r.json()["results"]), strict=True))
            started = time.time()

            async def all_polled() -> bool:
                accounts = await listed(h.client)
                return all(accounts[i]["primary_used_percent"] is not None for i in ids.values())

            await wait_for(all_polled)
            accounts = await listed(h.client)

            ok = accounts[ids["ok"]]
            assert ok["status"] == "active"
            assert ok["primary_used_percent"] == 12.5
            assert ok["secondary_used_percent"] == 30
            # reset_after_seconds only: the reset time is "now + 9000 s".
            assert started + 9000 - 5 <= epoch(ok["primary_reset_at"]) <= time.time() + 9000 + 1
            assert epoch(ok["secondary_reset_at"]) == 1_900_500_000
            assert ok["secondary_reset_at"] == rfc3339(1_900_500_000)

            limited = accounts[ids["limited"]]
            assert limited["status"] == "rate_limited"
            assert limited["primary_used_percent"] == 80
            assert epoch(limited["primary_reset_at"]) == 1_900_000_000
            assert accounts[ids["full5h"]]["status"] == "rate_limited"
            assert accounts[ids["weekly"]]["status"] == "quota_exceeded"
            assert accounts[paused_id]["status"] == "paused"
            assert accounts[paused_id]["primary_used_percent"] is None
            assert accounts[reauth_id]["status"] == "reauth_required"

            # What the upstream said is hot state, kept apart from the cold record: the
            # operator's status there stays as it was, and no token-holding hash is rewritten.
            for name in ("ok", "limited", "full5h", "weekly"):
                assert account_hash(raw_redis, prefix, ids[name])[b"status"] == b"active"
                hot = raw_redis.hgetall(f"{prefix}account_state:{ids[name]}")
                usage_json = json.loads(hot[b"usage"])
                assert (
                    usage_json["secondary_used_percent"]
                    == replies[f"acct-{name}"]["rate_limit"]["secondary_window"]["used_percent"]
                )
                assert b"tokens" not in hot
            assert not raw_redis.exists(f"{prefix}account_state:{paused_id}")
            assert not raw_redis.exists(f"{prefix}account_state:{reauth_id}")

            # Each poll is made with that account's own access token and account id.
            for account, authorization in list(calls):
                assert account not in ("acct-paused", "acct-reauth")
                expected = tokens_of(docs[account.removeprefix("acct-")])["access_token"]
                assert authorization == f"Bearer {expected}"

            # Recovery: the windows drop and the accounts serve again.
            for name in ("limited", "full5h", "weekly"):
                replies[f"acct-{name}"] = wham(5, 5)

            async def recovered() -> bool:
                accounts = await listed(h.client)
                return all(
                    accounts[ids[n]]["status"] == "active" for n in ("limited", "full5h", "weekly")
                )

            await wait_for(recovered)
            assert raw_redis.hget(f"{prefix}account:{ids['weekly']}", "status") == b"active"
            assert (await listed(h.client))[paused_id]["status"] == "paused"
    assert_no_secret(logs.text, secrets_of(*docs.values()), "the log")


async def test_only_one_process_polls(
    redis_url: str, prefix: str, tmp_path: Path, raw_redis: redis.Redis
) -> None:
    interval = 0.2
    calls: list[tuple[str, str, float]] = []  # (app, account id, when)

    def tagged(h: AppHarness, name: str) -> None:
        async def hook(request: httpx.Request) -> None:
            if request.url.path.endswith("/wham/usage"):
                calls.append((name, request.headers["chatgpt-account-id"], time.monotonic()))

        h.parts.http.event_hooks["request"].append(hook)

    config = make_config(redis_url, prefix, tmp_path, usage_poll_seconds=interval)
    with respx.mock(assert_all_called=False) as mock:
        mock.get(WHAM).respond(200, json=wham(10, 10))
        running: list[AppHarness] = []
        try:
            for _ in range(2):
                running.append(await AppHarness(config).__aenter__())
            a, b = running
            tagged(a, "a")
            tagged(b, "b")
            await setup_password(a.client)
            r = await import_docs(a.client, *folder(3))
            accounts = {x["account"]["chatgpt_account_id"] for x in r.json()["results"]}
            await asyncio.sleep(0.5)  # both live copies have the accounts by now
            calls.clear()
            window = 1.2
            await asyncio.sleep(window)
            seen = list(calls)
            pollers = {app for app, _, _ in seen}
            assert len(pollers) == 1, pollers
            for account in accounts:
                n = sum(1 for _, acc, _ in seen if acc == account)
                assert 2 <= n <= window / interval + 2, (account, n)
            assert raw_redis.exists(f"{prefix}lease:usage-poller")

            # The polling process goes away: the other one takes over.
            holder, survivor = (a, "b") if pollers == {"a"} else (b, "a")
            running.remove(holder)
            await holder.__aexit__(None, None, None)
            calls.clear()
            deadline = time.monotonic() + 3
            while not any(app == survivor for app, _, _ in calls):
                assert time.monotonic() < deadline, "no process took over the polling"
                await asyncio.sleep(0.05)
            assert {app for app, _, _ in calls} == {survivor}
        finally:
            for h in running:
                await h.__aexit__(None, None, None)
