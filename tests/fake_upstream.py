"""A fake of the upstream (ChatGPT's Codex backend and OpenAI's auth server) in one aiohttp app.

The shapes follow ../shared/spec/UPSTREAM.md and what the real Codex CLI accepts. End-to-end
tests and benchmarks point the proxy's ``upstream_base_url`` and ``auth_base_url`` at its root;
the Codex CLI may also talk to it directly (base URL ``{root}/codex``).

Run it as a process with ``python -m tests.fake_upstream --port N`` (nothing on stdout, logs on
stderr, a clean exit on SIGTERM/SIGINT), in a test with ``running_fake()`` (that subprocess on a
free loopback port, driven through ``FakeUpstream``), or in-process with ``make_app()``.

Upstream routes: ``POST /codex/responses``, ``POST /codex/responses/compact``,
``GET /codex/models``, ``POST /transcribe``, ``GET /wham/usage``, ``POST /oauth/token``.

Control routes (JSON), under ``/_fake/``:

- ``POST /_fake/accounts/{account_id}``: merge fields of ``Behaviour`` (below) into that
  account's behaviour; answers the whole behaviour. ``GET`` answers it too.
- ``POST /_fake/settings``: merge fields of ``Settings`` (process-wide); ``GET`` answers them.
- ``POST /_fake/reset``: everything back to the start (behaviours, records, stats, tokens).
- ``GET /_fake/requests?since=N``: ``{"requests": [...], "last_seq": M}``, the records after
  sequence number N (the last 10,000 are kept).
- ``GET /_fake/stats``: ``{"total": n, "accounts": {id: {"requests", "statuses", "aborted"}}}``.
- ``POST /_fake/recording`` ``{"on": bool}``: records off for benchmarks (stats still count).
- ``POST /_fake/revoke`` ``{"token": "..."}``: that access token now gets 401 token_expired, or
  that refresh token ``invalid_grant``/``refresh_token_invalidated``.
- ``POST /_fake/refresh_tokens`` ``{"refresh_token", "account_id", "email", "plan"}``: whose a
  refresh token is, so the id_token a refresh answers names the right account.
- ``GET /_fake/quota?since=N`` and ``POST /_fake/quota/start`` ``{"epoch": E}``: quota mode.

Quota mode (an account's behaviour field ``quota``, e.g. ``POST /_fake/accounts/a`` with
``{"quota": {"capacity": 40, "window_seconds": 30, "offset_seconds": 7, "weekly_capacity": 120,
"weekly_window_seconds": 90, "weekly_offset_seconds": 0, "spent": 0, "weekly_spent": 0}}``;
``{"quota": null}`` turns it off; the fields are ``Quota``'s). Each account has a short window
(the "5-hour" one, compressed) and a weekly one; window k of a kind spans
[epoch + offset + k·L, epoch + offset + (k+1)·L) on the fake's wall clock, where the epoch is a
whole second common to every account: the moment quota mode was first configured, or the last
``/_fake/quota/start`` (which also starts every quota afresh and empties the timeline). So every
window end is an exact epoch second, and offsets stagger the resets. ``spent``/``weekly_spent``
are units already spent, at the epoch, in the windows then in progress.

Each ``/codex/responses`` (or ``/compact``) request that would be served spends one unit in both
windows in progress when it arrives. When either has none left it is answered at once (no
``delay_first_byte``) with 429 ``usage_limit_reached``, ``resets_at`` the end of the exhausted
window (the later one when both are) and ``resets_in_seconds``. Every answer (and
``/wham/usage``, which spends nothing) carries the usage as it is when the answer starts: the
``x-codex-primary-*`` headers tell the short window (spent/capacity·100 percent, window minutes
300, ``reset-at`` its end, ``reset-after-seconds``), the ``x-codex-secondary-*`` ones the weekly
window (10080 minutes); ``rate_limits_event`` puts the same into the stream. Scripted ``fail``
answers still apply first and spend nothing.

``GET /_fake/quota`` answers the ground truth: ``epoch``, ``now``, per account its ``quota``,
``room`` (a unit left in both windows now) and every window begun since the epoch
(``windows``, ``weekly_windows``: index, start, end, capacity, initial, spent), and the
``timeline`` of requests after sequence number ``since`` (the last 200,000 are kept), each with
``seq``, ``time`` (arrival), ``account_id``, ``path``, ``status`` (or ``"drop"``), ``room`` (the
account had room on arrival), ``spent``, the ``session`` header (``session_id``), the
``x-fake-tag`` header as ``tag``, ``answered`` (when its answer started: after
``delay_first_byte``, at once for a quota 429) and both windows as that answer told them
(``short_spent``, ``short_capacity``, ``short_end``, ``weekly_*``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import logging
import math
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
from aiohttp import web

from tests.factories import AUTH_CLAIM, auth_json, jwt

log = logging.getLogger("fake_upstream")

ROOT = Path(__file__).resolve().parent.parent
MAX_RECORDS = 10_000
ANONYMOUS = "anonymous"  # the account key of requests without chatgpt-account-id (lenient mode)
FAILURES = ("drop", "mid_stream")  # besides HTTP statuses (int, 400..599)
MODELS = ["gpt-5.1-codex", "gpt-5.1-codex-mini"]

_encode = msgspec.json.encode
_decode = msgspec.json.decode


@dataclasses.dataclass
class Behaviour:
    """What one chatgpt-account-id sees; every field can be set by ``POST /_fake/accounts/{id}``.

    Usage: ``*_used_percent``, ``*_window_minutes``, and either ``*_reset_at`` (epoch seconds)
    or ``*_reset_after_seconds`` (counted from each response), sent as the ``x-codex-*`` headers,
    in the ``codex.rate_limits`` event (``rate_limits_event``) and by ``/wham/usage``.
    ``single_window``: one window only, the weekly one sent as "primary" (secondary_* unused).

    ``fail``: 429 (usage_limit_reached), 401 (token_expired), any other status >= 400 (a
    server_error body), ``"drop"`` (the connection closed with no answer) or ``"mid_stream"``
    (a 200 stream cut after ``mid_stream_events`` events; a non-streamed request is dropped);
    for ``fail_times`` requests (then it clears itself), or always when ``fail_times`` is null.
    Setting ``fail`` without ``fail_times`` means always. ``fail_mid_stream: true`` is short for
    ``fail: "mid_stream"``. Failures apply to ``/codex/responses`` and its ``/compact``.

    Answers: ``text`` (default ``Hello from <account id>.``) in ``deltas`` deltas, after
    ``delay_first_byte`` seconds, ``delta_delay`` seconds apart. ``tool_calls: false`` answers
    text even when the request offers function tools (the real Codex CLI always offers some);
    otherwise the first function tool is called with ``tool_arguments`` (a JSON text).
    """

    plan_type: str = "plus"
    primary_used_percent: float = 0.0
    primary_window_minutes: int = 300
    primary_reset_at: int | None = None
    primary_reset_after_seconds: int = 3600
    secondary_used_percent: float = 0.0
    secondary_window_minutes: int = 10080
    secondary_reset_at: int | None = None
    secondary_reset_after_seconds: int = 86400
    single_window: bool = False
    rate_limits_event: bool = False
    fail: int | str | None = None
    fail_times: int | None = None
    mid_stream_events: int = 4
    delay_first_byte: float = 0.0
    delta_delay: float = 0.0
    deltas: int = 5
    text: str | None = None
    tool_calls: bool = True
    tool_arguments: str = '{"x": 1}'
    # Quota mode (see the module's docstring): the fields of ``Quota`` as a JSON object, or None.
    quota: dict[str, Any] | None = None

    def merge(self, patch: dict[str, Any]) -> None:
        patch = dict(patch)
        if patch.pop("fail_mid_stream", False):
            patch["fail"] = "mid_stream"
        names = {field.name for field in dataclasses.fields(self)}
        unknown = sorted(set(patch) - names)
        if unknown:
            raise ValueError(f"unknown behaviour fields: {unknown}")
        fail = patch.get("fail", self.fail)
        if fail is not None and not (
            fail in FAILURES or (isinstance(fail, int) and 400 <= fail <= 599)
        ):
            raise ValueError(f"fail must be a status >= 400, 'drop' or 'mid_stream', not {fail!r}")
        if "fail" in patch and "fail_times" not in patch:
            patch["fail_times"] = None
        if patch.get("quota") is not None:
            patch["quota"] = dataclasses.asdict(Quota.of(patch["quota"]))
        for name, value in patch.items():
            setattr(self, name, value)

    def window(self, which: str, now: float) -> tuple[float, int, int, int]:
        """(used percent, window minutes, reset at, reset after seconds) of one window."""
        used = getattr(self, f"{which}_used_percent")
        minutes = getattr(self, f"{which}_window_minutes")
        reset_at = getattr(self, f"{which}_reset_at")
        if reset_at is None:
            after = int(getattr(self, f"{which}_reset_after_seconds"))
            return used, minutes, int(now) + after, after
        return used, minutes, int(reset_at), max(0, int(reset_at - now))

    def windows(self, now: float) -> list[tuple[float, int, int, int]]:
        """The windows sent, the first as "primary": one (the weekly) with ``single_window``."""
        if self.single_window:
            return [self.window("secondary", now)]
        return [self.window("primary", now), self.window("secondary", now)]


SHORT, WEEKLY = "short", "weekly"
# What the windows of quota mode are called in the headers (their real lengths, in minutes).
SHORT_MINUTES, WEEKLY_MINUTES = 300, 10080
MAX_TIMELINE = 200_000


@dataclasses.dataclass(frozen=True)
class Quota:
    """Quota mode's configuration of one account (all times in whole seconds, so that window
    ends are exact epoch seconds).

    ``capacity`` units per short ("5-hour") window of ``window_seconds``; ``weekly_capacity``
    (None: no weekly limit) per weekly window of ``weekly_window_seconds`` (default 3 short
    windows). ``offset_seconds``/``weekly_offset_seconds`` shift the windows from the common
    epoch; ``spent``/``weekly_spent`` are the units already spent, at the epoch, in the window in
    progress then (an account already in use when the simulation starts).
    """

    capacity: int
    window_seconds: int
    offset_seconds: int = 0
    weekly_capacity: int | None = None
    weekly_window_seconds: int | None = None
    weekly_offset_seconds: int = 0
    spent: int = 0
    weekly_spent: int = 0

    @classmethod
    def of(cls, fields: object) -> Quota:
        if not isinstance(fields, dict):
            raise ValueError("quota must be a JSON object")
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - names)
        if unknown:
            raise ValueError(f"unknown quota fields: {unknown}")
        for name, value in fields.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"quota.{name} must be a whole number, not {value!r}")
        try:
            quota = cls(**fields)
        except TypeError as error:
            raise ValueError(f"quota: {error}") from None
        if quota.capacity < 0 or quota.window_seconds < 1:
            raise ValueError("quota needs capacity >= 0 and window_seconds >= 1")
        if quota.weekly_capacity is not None and quota.weekly_capacity < 0:
            raise ValueError("quota.weekly_capacity must be >= 0")
        if quota.weekly_window_seconds is not None and quota.weekly_window_seconds < 1:
            raise ValueError("quota.weekly_window_seconds must be >= 1")
        if quota.spent < 0 or quota.weekly_spent < 0:
            raise ValueError("quota.spent and quota.weekly_spent must be >= 0")
        return quota

    def shape(self, kind: str) -> tuple[int, int, int | None]:
        """(window seconds, offset seconds, capacity or None for unlimited) of one kind."""
        if kind == SHORT:
            return self.window_seconds, self.offset_seconds, self.capacity
        length = self.weekly_window_seconds or 3 * self.window_seconds
        return length, self.weekly_offset_seconds, self.weekly_capacity

    def bounds(self, kind: str, epoch: int, at: float) -> tuple[int, int, int]:
        """(index, start, end) of the window of ``kind`` in progress at ``at``: window k spans
        [epoch + offset + k·L, epoch + offset + (k+1)·L)."""
        length, offset, _ = self.shape(kind)
        start = epoch + offset
        index = math.floor((at - start) / length)
        return index, start + index * length, start + (index + 1) * length


@dataclasses.dataclass
class Ledger:
    """Quota mode's bookkeeping of one account: units spent per window since the epoch."""

    quota: Quota
    epoch: int
    spent: dict[tuple[str, int], int] = dataclasses.field(default_factory=dict)
    first: dict[str, int] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for kind, initial in ((SHORT, self.quota.spent), (WEEKLY, self.quota.weekly_spent)):
            index = self.quota.bounds(kind, self.epoch, self.epoch)[0]
            self.first[kind] = index
            self.spent[kind, index] = initial

    def window(self, kind: str, at: float) -> dict[str, Any]:
        index, start, end = self.quota.bounds(kind, self.epoch, at)
        capacity = self.quota.shape(kind)[2]
        return {
            "index": index,
            "start": start,
            "end": end,
            "capacity": capacity,
            "spent": self.spent.get((kind, index), 0),
        }

    def left(self, kind: str, at: float) -> float:
        window = self.window(kind, at)
        if window["capacity"] is None:
            return math.inf
        return float(window["capacity"] - window["spent"])

    def room(self, at: float) -> bool:
        return self.left(SHORT, at) > 0 and self.left(WEEKLY, at) > 0

    def spend(self, at: float) -> None:
        for kind in (SHORT, WEEKLY):
            index = self.quota.bounds(kind, self.epoch, at)[0]
            self.spent[kind, index] = self.spent.get((kind, index), 0) + 1

    def windows(self, at: float) -> list[tuple[float, int, int, int]]:
        """(used percent, window minutes, reset at, reset after seconds) of both windows, as
        the headers, the rate-limits event and ``/wham/usage`` send them."""
        out = []
        for kind, minutes in ((SHORT, SHORT_MINUTES), (WEEKLY, WEEKLY_MINUTES)):
            window = self.window(kind, at)
            capacity = window["capacity"]
            if capacity is None:
                used = 0.0
            elif capacity == 0:
                used = 100.0
            else:
                used = min(100.0, 100.0 * window["spent"] / capacity)
            after = max(0, math.ceil(window["end"] - at))
            out.append((used, minutes, int(window["end"]), after))
        return out

    def limit(self, at: float) -> tuple[int, int]:
        """(resets at, resets in seconds) for a 429: the end of the exhausted window, the
        later of the two when both are."""
        kinds = (SHORT, WEEKLY)
        ends = [self.window(kind, at)["end"] for kind in kinds if self.left(kind, at) <= 0]
        end = int(max(ends)) if ends else int(self.window(SHORT, at)["end"])
        return end, max(0, math.ceil(end - at))

    def begun(self, kind: str, at: float) -> list[dict[str, Any]]:
        """Every window of ``kind`` from the one in progress at the epoch to the current one."""
        last = self.quota.bounds(kind, self.epoch, at)[0]
        length, offset, capacity = self.quota.shape(kind)
        start = self.epoch + offset
        initial = self.quota.spent if kind == SHORT else self.quota.weekly_spent
        return [
            {
                "index": index,
                "start": start + index * length,
                "end": start + (index + 1) * length,
                "capacity": capacity,
                "initial": initial if index == self.first[kind] else 0,
                "spent": self.spent.get((kind, index), 0),
            }
            for index in range(self.first[kind], last + 1)
        ]

    def snapshot(self, at: float) -> dict[str, Any]:
        return {
            "quota": dataclasses.asdict(self.quota),
            "room": self.room(at),
            "windows": self.begun(SHORT, at),
            "weekly_windows": self.begun(WEEKLY, at),
        }


@dataclasses.dataclass
class AccountState:
    """One account's behaviour and what happened to it so far."""

    behaviour: Behaviour = dataclasses.field(default_factory=Behaviour)
    requests: int = 0
    statuses: collections.Counter[int] = dataclasses.field(default_factory=collections.Counter)
    aborted: int = 0  # streams the client left (or mid_stream cut) before response.completed
    cache_keys: set[str] = dataclasses.field(default_factory=set)
    ledger: Ledger | None = None  # quota mode

    def windows(self, now: float) -> list[tuple[float, int, int, int]]:
        """The usage windows sent now: quota mode's ledger, else the behaviour's fields."""
        if self.ledger is not None:
            return self.ledger.windows(now)
        return self.behaviour.windows(now)

    def take_failure(self) -> int | str | None:
        behaviour = self.behaviour
        fail = behaviour.fail
        if fail is None:
            return None
        if behaviour.fail_times is not None:
            behaviour.fail_times -= 1
            if behaviour.fail_times <= 0:
                behaviour.fail, behaviour.fail_times = None, None
        return fail

    def cached_tokens(self, key: object, input_tokens: int) -> int:
        """Half the input counts as cached when this account saw the prompt_cache_key before."""
        if not isinstance(key, str) or not key:
            return 0
        if key in self.cache_keys:
            return input_tokens // 2
        if len(self.cache_keys) > 100_000:
            self.cache_keys.clear()
        self.cache_keys.add(key)
        return 0


@dataclasses.dataclass
class Settings:
    """Process-wide knobs (``POST /_fake/settings``).

    ``require_account_id``: when on (the default), requests lacking chatgpt-account-id get 400;
    when off they count as account ``anonymous`` (for a Codex CLI that talks to the fake
    directly with an API key). ``oauth_fail``/``oauth_fail_times``: scripted statuses of
    ``/oauth/token`` (like ``Behaviour.fail``). ``access_token_ttl``: seconds to the ``exp`` of
    the access tokens a refresh issues.
    """

    require_account_id: bool = True
    access_token_ttl: int = 3600
    oauth_fail: int | None = None
    oauth_fail_times: int | None = None

    def merge(self, patch: dict[str, Any]) -> None:
        names = {field.name for field in dataclasses.fields(self)}
        unknown = sorted(set(patch) - names)
        if unknown:
            raise ValueError(f"unknown settings: {unknown}")
        if "oauth_fail" in patch and "oauth_fail_times" not in patch:
            patch = {**patch, "oauth_fail_times": None}
        for name, value in patch.items():
            setattr(self, name, value)


@dataclasses.dataclass
class Identity:
    account_id: str | None
    email: str = "user@example.com"
    plan: str = "plus"


class FakeState:
    """Everything the fake remembers; ``make_app(state)`` lets an in-process test look at it."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.accounts: dict[str, AccountState] = {}
        self.settings = Settings()
        self.records: collections.deque[dict[str, Any]] = collections.deque(maxlen=MAX_RECORDS)
        self.seq = 0
        self.recording = True
        self.total = 0
        self.revoked: set[str] = set()
        self.used_refresh_tokens: set[str] = set()
        self.identities: dict[str, Identity] = {}
        self.ids = itertools.count(1)
        self.prefix = secrets.token_hex(4)
        self.quota_epoch: int | None = None
        self.timeline: collections.deque[dict[str, Any]] = collections.deque(maxlen=MAX_TIMELINE)
        self.timeline_seq = 0

    def account(self, account_id: str) -> AccountState:
        state = self.accounts.get(account_id)
        if state is None:
            state = self.accounts[account_id] = AccountState()
        return state

    def set_quota(self, account: AccountState) -> None:
        """The account's quota (just configured) starts afresh on the common epoch."""
        fields = account.behaviour.quota
        if fields is None:
            account.ledger = None
            return
        if self.quota_epoch is None:
            self.quota_epoch = int(time.time())
        account.ledger = Ledger(Quota(**fields), self.quota_epoch)

    def start_quota(self, epoch: int) -> None:
        """A new epoch: every quota afresh, the timeline emptied."""
        self.quota_epoch = epoch
        self.timeline.clear()
        for account in self.accounts.values():
            self.set_quota(account)

    def quota_event(
        self,
        request: web.Request,
        account_id: str,
        ledger: Ledger,
        at: float,
        room: bool,
        spent: bool,
    ) -> dict[str, Any]:
        """One quota-mode request on the timeline (the caller sets its status and, with
        ``answered``, the windows its answer tells): whether the account had room when it
        arrived, whether it spent a unit."""
        self.timeline_seq += 1
        headers = request.headers
        event = {
            "seq": self.timeline_seq,
            "time": at,
            "account_id": account_id,
            "path": request.path,
            "status": None,
            "room": room,
            "spent": spent,
            "session": headers.get("session_id")
            or headers.get("session-id")
            or headers.get("x-session-id"),
            "tag": headers.get("x-fake-tag"),
        }
        answered(event, ledger, at)
        self.timeline.append(event)
        return event

    def next_id(self) -> str:
        return f"{self.prefix}{next(self.ids):x}"

    def record(self, request: web.Request, account_id: str | None, body: bytes) -> dict[str, Any]:
        """Counts the request and, when recording, keeps it (the caller may add its status)."""
        self.total += 1
        if not self.recording:
            return {}
        self.seq += 1
        entry = {
            "seq": self.seq,
            "time": time.time(),
            "method": request.method,
            "path": request.path_qs,
            "account_id": account_id,
            "headers": _lowercased(request),
            "body": body,
            "status": None,
            "completed": None,
        }
        self.records.append(entry)
        return entry


def answered(event: dict[str, Any], ledger: Ledger, at: float) -> None:
    """A timeline entry's answer: when it started and what it told of both windows."""
    short, weekly = ledger.window(SHORT, at), ledger.window(WEEKLY, at)
    event.update(
        answered=at,
        short_spent=short["spent"],
        short_capacity=short["capacity"],
        short_end=short["end"],
        weekly_spent=weekly["spent"],
        weekly_capacity=weekly["capacity"],
        weekly_end=weekly["end"],
    )


def _lowercased(request: web.Request) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return headers


def _public(entry: dict[str, Any]) -> dict[str, Any]:
    body: bytes = entry["body"]
    out = {key: value for key, value in entry.items() if key != "body"}
    try:
        out["body"] = body.decode()
    except UnicodeDecodeError:
        out["body"] = None
        out["body_b64"] = base64.b64encode(body).decode()
    try:
        out["json"] = _decode(body) if body else None
    except msgspec.DecodeError:
        out["json"] = None
    out["body_sha256"] = hashlib.sha256(body).hexdigest()
    return out


STATE_KEY = web.AppKey("state", FakeState)


def _state(request: web.Request) -> FakeState:
    return request.app[STATE_KEY]


# --- responses --------------------------------------------------------------------------------


def _percent(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


Windows = list[tuple[float, int, int, int]]  # (used percent, minutes, reset at, reset after)


def _headers(state: FakeState, windows: Windows, started: float) -> dict[str, str]:
    request_id = state.next_id()
    headers = {
        "x-request-id": f"req_{request_id}",
        "openai-processing-ms": str(int((time.monotonic() - started) * 1000)),
        "x-codex-turn-state": f"ts_{request_id}",
        "set-cookie": "__cf_bm=abc; Path=/",
    }
    for name, (used, minutes, reset_at, after) in zip(
        ("primary", "secondary"), windows, strict=False
    ):
        headers[f"x-codex-{name}-used-percent"] = _percent(used)
        headers[f"x-codex-{name}-window-minutes"] = str(minutes)
        headers[f"x-codex-{name}-reset-at"] = str(reset_at)
        headers[f"x-codex-{name}-reset-after-seconds"] = str(after)
    return headers


def _error(status: int, error: dict[str, Any], headers: dict[str, str]) -> web.Response:
    return web.Response(
        status=status,
        body=_encode({"error": error}),
        content_type="application/json",
        headers=headers,
    )


def _limit_response(
    plan_type: str, reset_at: int, after: int, headers: dict[str, str]
) -> web.Response:
    return _error(
        429,
        {
            "type": "usage_limit_reached",
            "message": "The usage limit has been reached",
            "plan_type": plan_type,
            "resets_at": reset_at,
            "resets_in_seconds": after,
        },
        headers,
    )


def _failure_response(
    status: int, behaviour: Behaviour, windows: Windows, headers: dict[str, str]
) -> web.Response:
    if status == 429:
        _, _, reset_at, after = windows[0]
        return _limit_response(behaviour.plan_type, reset_at, after, headers)
    if status == 401:
        return _error(401, _TOKEN_EXPIRED, headers)
    return _error(
        status, {"type": "server_error", "message": f"fake upstream failure {status}"}, headers
    )


_TOKEN_EXPIRED = {
    "code": "token_expired",
    "type": "invalid_request_error",
    "message": "Provided authentication token is expired. Please try signing in again.",
}


class _Refused(Exception):
    def __init__(self, response: web.Response):
        self.response = response


def _authorize(request: web.Request, state: FakeState) -> str:
    """The request's account id; raises _Refused for a missing or revoked credential."""
    authorization = request.headers.get("Authorization", "")
    if not authorization.startswith("Bearer ") or len(authorization) <= 7:
        raise _Refused(
            _error(401, {"code": "missing_authorization", "message": "no bearer token"}, {})
        )
    if authorization[7:] in state.revoked:
        raise _Refused(_error(401, _TOKEN_EXPIRED, {}))
    account_id = request.headers.get("chatgpt-account-id")
    if account_id:
        return account_id
    if state.settings.require_account_id:
        raise _Refused(
            _error(400, {"code": "missing_account_id", "message": "no chatgpt-account-id"}, {})
        )
    return ANONYMOUS


def _refuse(
    state: FakeState, request: web.Request, raw: bytes, response: web.Response
) -> web.Response:
    """Counts and records a request refused for its credentials, then answers ``response``."""
    account_id = request.headers.get("chatgpt-account-id")
    if account_id:
        account = state.account(account_id)
        account.requests += 1
        account.statuses[response.status] += 1
    entry = state.record(request, account_id, raw)
    if entry:
        entry["status"] = response.status
    return response


def _event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + _encode(data) + b"\n\n"


def _split(text: str, parts: int) -> list[str]:
    parts = max(1, min(parts, len(text) or 1))
    size, extra = divmod(len(text), parts)
    pieces, start = [], 0
    for index in range(parts):
        end = start + size + (1 if index < extra else 0)
        pieces.append(text[start:end])
        start = end
    return pieces


def _message_item(text: str, status: str = "completed") -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": []}] if status else []
    return {
        "id": "msg_1",
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": content,
    }


@functools.lru_cache(maxsize=256)
def _message_events(text: str, deltas: int, seq: int) -> tuple[bytes, ...]:
    """The events between response.created (and codex.rate_limits) and response.completed."""
    added = {"id": "msg_1", "type": "message", "status": "in_progress", "role": "assistant"}
    part = {"type": "output_text", "text": "", "annotations": []}
    where = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
    events = [
        ("response.output_item.added", {"output_index": 0, "item": {**added, "content": []}}),
        ("response.content_part.added", {**where, "part": part}),
    ]
    events += [
        ("response.output_text.delta", {**where, "delta": piece, "logprobs": []})
        for piece in _split(text, deltas)
    ]
    events += [
        ("response.output_text.done", {**where, "text": text, "logprobs": []}),
        ("response.content_part.done", {**where, "part": {**part, "text": text}}),
        ("response.output_item.done", {"output_index": 0, "item": _message_item(text)}),
    ]
    return tuple(
        _event(name, {"type": name, "sequence_number": seq + index, **data})
        for index, (name, data) in enumerate(events)
    )


def _call_item(name: str, arguments: str, status: str) -> dict[str, Any]:
    return {
        "id": "fc_1",
        "type": "function_call",
        "status": status,
        "call_id": "call_1",
        "name": name,
        "arguments": arguments,
    }


@functools.lru_cache(maxsize=64)
def _call_events(name: str, arguments: str, seq: int) -> tuple[bytes, ...]:
    where = {"item_id": "fc_1", "output_index": 0}
    half = len(arguments) // 2
    added = _call_item(name, "", "in_progress")
    done = _call_item(name, arguments, "completed")
    events = [
        ("response.output_item.added", {"output_index": 0, "item": added}),
        ("response.function_call_arguments.delta", {**where, "delta": arguments[:half]}),
        ("response.function_call_arguments.delta", {**where, "delta": arguments[half:]}),
        ("response.function_call_arguments.done", {**where, "arguments": arguments}),
        ("response.output_item.done", {"output_index": 0, "item": done}),
    ]
    return tuple(
        _event(kind, {"type": kind, "sequence_number": seq + index, **data})
        for index, (kind, data) in enumerate(events)
    )


def _plan(body: dict[str, Any], account_id: str, behaviour: Behaviour) -> tuple[str, str]:
    """("text", answer) or ("call", function name), from the request and the behaviour."""
    items = body.get("input")
    last = items[-1] if isinstance(items, list) and items else None
    if isinstance(last, dict) and last.get("type") == "function_call_output":
        output = last.get("output")
        if not isinstance(output, str):
            output = _encode(output).decode()
        return "text", f"Tool said: {output}"
    if behaviour.tool_calls:
        for tool in body.get("tools") or ():
            if isinstance(tool, dict) and tool.get("type") == "function":
                name = tool.get("name") or (tool.get("function") or {}).get("name")
                if name:
                    return "call", str(name)
    return "text", behaviour.text if behaviour.text is not None else f"Hello from {account_id}."


def _usage(input_tokens: int, cached: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


def _rate_limits(windows: Windows) -> dict[str, Any]:
    limits: dict[str, Any] = {}
    for name, (used, minutes, reset_at, _) in zip(("primary", "secondary"), windows, strict=False):
        limits[name] = {"used_percent": used, "window_minutes": minutes, "resets_at": reset_at}
    return {"type": "codex.rate_limits", "rate_limits": limits}


def _drop(request: web.Request) -> web.Response:
    if request.transport is not None:
        request.transport.abort()
    return web.Response(status=204)


async def responses(request: web.Request) -> web.StreamResponse:
    started = time.monotonic()
    admitted = await _admitted(request)
    if isinstance(admitted, web.Response):
        return admitted
    state, account, account_id, raw, entry = admitted
    behaviour = account.behaviour
    now = time.time()
    failure = account.take_failure()
    ledger = account.ledger
    noted: dict[str, Any] = {}  # quota mode's timeline entry
    if ledger is not None:
        room = ledger.room(now)
        if room and failure is None:
            ledger.spend(now)
        noted = state.quota_event(request, account_id, ledger, now, room, room and failure is None)
        if not room and failure is None:  # out of quota: answered at once, without the delay
            account.statuses[429] += 1
            entry["status"] = noted["status"] = 429
            reset_at, after = ledger.limit(now)
            headers = _headers(state, ledger.windows(now), started)
            return _limit_response(behaviour.plan_type, reset_at, after, headers)
    if behaviour.delay_first_byte:
        await asyncio.sleep(behaviour.delay_first_byte)
    # Quota mode tells the usage as it is when the answer starts; otherwise as configured.
    windows = behaviour.windows(now)
    if ledger is not None:
        answer_at = time.time()
        windows = ledger.windows(answer_at)
        answered(noted, ledger, answer_at)
    headers = _headers(state, windows, started)
    compact = request.path.endswith("/compact")
    if failure == "drop":
        account.aborted += 1
        noted["status"] = "drop"
        return _drop(request)
    if isinstance(failure, int):
        account.statuses[failure] += 1
        entry["status"] = noted["status"] = failure
        return _failure_response(failure, behaviour, windows, headers)
    try:
        body = _decode(raw) if raw else {}
    except msgspec.DecodeError:
        body = None
    if not isinstance(body, dict):
        account.statuses[400] += 1
        entry["status"] = noted["status"] = 400
        return _error(400, {"type": "invalid_request_error", "message": "bad JSON"}, headers)
    if failure == "mid_stream" and (compact or not body.get("stream")):
        account.aborted += 1  # nothing to cut in the middle: dropped
        noted["status"] = "drop"
        return _drop(request)
    account.statuses[200] += 1
    entry["status"] = noted["status"] = 200
    if compact:
        return _compact(body, raw, headers)
    kind, answer = _plan(body, account_id, behaviour)
    input_tokens = max(1, len(raw) // 4)
    usage = _usage(
        input_tokens,
        account.cached_tokens(body.get("prompt_cache_key"), input_tokens),
        behaviour.deltas if kind == "text" else 4,
    )
    item = (
        _message_item(answer)
        if kind == "text"
        else _call_item(answer, behaviour.tool_arguments, "completed")
    )
    response_id = f"resp_{state.next_id()}"
    model = body.get("model") or MODELS[0]
    head = {"id": response_id, "object": "response", "created_at": int(now), "model": model}
    if not body.get("stream"):
        entry["completed"] = True
        done = {**head, "status": "completed", "output": [item], "usage": usage}
        return web.Response(body=_encode(done), content_type="application/json", headers=headers)

    headers["Content-Type"] = "text/event-stream"
    headers["Cache-Control"] = "no-cache"
    stream = web.StreamResponse(headers=headers)
    events = [
        _event(
            "response.created",
            {
                "type": "response.created",
                "sequence_number": 0,
                "response": {**head, "status": "in_progress", "output": []},
            },
        )
    ]
    if behaviour.rate_limits_event:
        events.append(_event("codex.rate_limits", _rate_limits(windows)))
    seq = len(events)
    middle = _message_events(answer, behaviour.deltas, seq) if kind == "text" else None
    events += middle if middle is not None else _call_events(answer, behaviour.tool_arguments, seq)
    completed = {**head, "status": "completed", "output": [item], "usage": usage}
    events.append(
        _event(
            "response.completed",
            {"type": "response.completed", "sequence_number": len(events), "response": completed},
        )
    )
    cut = behaviour.mid_stream_events if failure == "mid_stream" else None
    delay = behaviour.delta_delay
    try:
        await stream.prepare(request)
        for index, event in enumerate(events):
            if index == cut:
                account.aborted += 1
                entry["completed"] = False
                if request.transport is not None:
                    request.transport.abort()
                return stream
            if delay and event.find(b".delta\n", 0, 64) != -1:
                await asyncio.sleep(delay)
            await stream.write(event)
        await stream.write_eof()
    except ConnectionResetError:  # the client left: the proxy must cancel upstream streams
        account.aborted += 1
        entry["completed"] = False
        return stream
    except asyncio.CancelledError:
        account.aborted += 1
        entry["completed"] = False
        raise
    entry["completed"] = True
    return stream


def _compact(body: dict[str, Any], raw: bytes, headers: dict[str, str]) -> web.Response:
    items = body.get("input")
    count = len(items) if isinstance(items, list) else (1 if items else 0)
    summary = f"Compacted {count} items."
    reply = {
        "output": [
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": summary}],
            }
        ],
        "input_items": count,
        "usage": _usage(max(1, len(raw) // 4), 0, 8),
    }
    return web.Response(body=_encode(reply), content_type="application/json", headers=headers)


async def _admitted(
    request: web.Request,
) -> tuple[FakeState, AccountState, str, bytes, dict[str, Any]] | web.Response:
    """The request's credentials checked, counted and recorded; or the refusal to answer."""
    state = _state(request)
    raw = await request.read()
    try:
        account_id = _authorize(request, state)
    except _Refused as refused:
        return _refuse(state, request, raw, refused.response)
    account = state.account(account_id)
    account.requests += 1
    return state, account, account_id, raw, state.record(request, account_id, raw)


async def _guarded(request: web.Request) -> tuple[FakeState, AccountState, str] | web.Response:
    """``_admitted``, for the routes that always answer 200 once admitted."""
    admitted = await _admitted(request)
    if isinstance(admitted, web.Response):
        return admitted
    state, account, account_id, _, entry = admitted
    account.statuses[200] += 1
    entry["status"] = 200
    return state, account, account_id


async def models(request: web.Request) -> web.Response:
    guarded = await _guarded(request)
    if isinstance(guarded, web.Response):
        return guarded
    state, account, _ = guarded
    reply = {
        "models": [
            {
                "slug": MODELS[0],
                "display_name": "GPT-5.1 Codex",
                "context_window": 272000,
                "supported_reasoning_levels": ["low", "medium", "high"],
            },
            {"slug": MODELS[1], "display_name": "GPT-5.1 Codex Mini", "context_window": 272000},
        ]
    }
    headers = _headers(state, account.windows(time.time()), time.monotonic())
    return web.Response(body=_encode(reply), content_type="application/json", headers=headers)


def _multipart_parts(content_type: str, body: bytes) -> list[tuple[dict[str, str], bytes]]:
    """(headers, content) of each part; hand-made so the file's bytes stay exactly as sent."""
    boundary = ""
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip('"')
    if not boundary:
        return []
    parts = []
    for chunk in body.split(b"--" + boundary.encode())[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, content = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        parts.append((headers, content.removesuffix(b"\r\n")))
    return parts


def _disposition(value: str) -> dict[str, str]:
    params = {}
    for param in value.split(";")[1:]:
        key, _, val = param.strip().partition("=")
        params[key.lower()] = val.strip('"')
    return params


async def transcribe(request: web.Request) -> web.Response:
    guarded = await _guarded(request)
    if isinstance(guarded, web.Response):
        return guarded
    state, account, _ = guarded
    raw = await request.read()
    reply: dict[str, Any] = {"text": "no file part", "fields": {}}
    for headers, content in _multipart_parts(request.headers.get("Content-Type", ""), raw):
        params = _disposition(headers.get("content-disposition", ""))
        if params.get("name") == "file":
            reply.update(
                text=f"transcribed {len(content)} bytes",
                bytes=len(content),
                sha256=hashlib.sha256(content).hexdigest(),
                filename=params.get("filename"),
                content_type=headers.get("content-type"),
            )
        else:
            reply["fields"][params.get("name", "")] = content.decode(errors="replace")
    headers = _headers(state, account.windows(time.time()), time.monotonic())
    return web.Response(body=_encode(reply), content_type="application/json", headers=headers)


async def wham_usage(request: web.Request) -> web.Response:
    guarded = await _guarded(request)
    if isinstance(guarded, web.Response):
        return guarded
    state, account, _ = guarded
    behaviour = account.behaviour
    now = time.time()
    windows = [
        {
            "used_percent": used,
            "limit_window_seconds": minutes * 60,
            "reset_after_seconds": after,
            "reset_at": reset_at,
        }
        for used, minutes, reset_at, after in account.windows(now)
    ]
    reached = any(window["used_percent"] >= 100 for window in windows)
    reply = {
        "plan_type": behaviour.plan_type,
        "rate_limit": {
            "allowed": not reached,
            "limit_reached": reached,
            "primary_window": windows[0],
            "secondary_window": windows[1] if len(windows) > 1 else None,
        },
        "credits": {"has_credits": False, "unlimited": False, "balance": "0"},
    }
    headers = _headers(state, account.windows(now), time.monotonic())
    return web.Response(body=_encode(reply), content_type="application/json", headers=headers)


# --- the auth server ---------------------------------------------------------------------------


def _oauth_error(status: int, error: str, description: str) -> web.Response:
    body = _encode({"error": error, "error_description": description})
    return web.Response(status=status, body=body, content_type="application/json")


async def oauth_token(request: web.Request) -> web.Response:
    state = _state(request)
    raw = await request.read()
    state.record(request, None, raw)
    settings = state.settings
    if settings.oauth_fail is not None:
        status = settings.oauth_fail
        if settings.oauth_fail_times is not None:
            settings.oauth_fail_times -= 1
            if settings.oauth_fail_times <= 0:
                settings.oauth_fail, settings.oauth_fail_times = None, None
        return _oauth_error(status, "server_error", f"fake oauth failure {status}")
    form: dict[str, Any]
    if request.content_type == "application/x-www-form-urlencoded":
        form = dict((await request.post()).items())
    else:
        try:
            form = _decode(raw) if raw else {}
        except msgspec.DecodeError:
            form = {}
    if not isinstance(form, dict) or form.get("grant_type") != "refresh_token":
        return _oauth_error(400, "unsupported_grant_type", "only refresh_token is faked")
    old = form.get("refresh_token")
    if not isinstance(old, str) or not old:
        return _oauth_error(400, "invalid_request", "refresh_token is required")
    if old in state.revoked:
        return _oauth_error(400, "invalid_grant", "refresh_token_invalidated")
    if old in state.used_refresh_tokens:
        return _oauth_error(400, "invalid_grant", "refresh_token_reused")
    state.used_refresh_tokens.add(old)
    identity = state.identities.get(old) or Identity(account_id=None)
    tokens = issue_tokens(state, identity)
    return web.Response(body=_encode(tokens), content_type="application/json")


def issue_tokens(state: FakeState, identity: Identity) -> dict[str, Any]:
    """A refresh's answer: new JWT-shaped access and id tokens and a new single-use refresh."""
    now = int(time.time())
    ttl = state.settings.access_token_ttl
    serial = state.next_id()
    claims: dict[str, Any] = {"chatgpt_plan_type": identity.plan}
    if identity.account_id is not None:
        claims["chatgpt_account_id"] = identity.account_id
    access = jwt({"exp": now + ttl, "iat": now, "sub": f"access-{serial}", AUTH_CLAIM: claims})
    id_claims = {**claims, "chatgpt_user_id": f"user-{identity.account_id}"}
    id_token = jwt({"email": identity.email, "exp": now + ttl, "iat": now, AUTH_CLAIM: id_claims})
    refresh = f"rt-fake-{serial}-{secrets.token_hex(8)}"
    state.identities[refresh] = identity
    return {
        "access_token": access,
        "refresh_token": refresh,
        "id_token": id_token,
        "expires_in": ttl,
        "token_type": "Bearer",
        "scope": "openid profile email offline_access",
    }


# --- control routes ----------------------------------------------------------------------------


async def _json(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    value = _decode(raw) if raw else {}
    if not isinstance(value, dict):
        raise web.HTTPBadRequest(text="a JSON object is expected")
    return value


def _behaviour_json(account_id: str, account: AccountState) -> web.Response:
    return web.json_response({"account_id": account_id, **dataclasses.asdict(account.behaviour)})


async def control_account(request: web.Request) -> web.Response:
    state = _state(request)
    account_id = request.match_info["account_id"]
    account = state.account(account_id)
    if request.method == "POST":
        patch = await _json(request)
        try:
            account.behaviour.merge(patch)
        except ValueError as error:
            raise web.HTTPBadRequest(text=str(error)) from None
        if "quota" in patch:
            state.set_quota(account)
    return _behaviour_json(account_id, account)


async def control_settings(request: web.Request) -> web.Response:
    state = _state(request)
    if request.method == "POST":
        try:
            state.settings.merge(await _json(request))
        except ValueError as error:
            raise web.HTTPBadRequest(text=str(error)) from None
    return web.json_response(dataclasses.asdict(state.settings))


async def control_reset(request: web.Request) -> web.Response:
    _state(request).reset()
    return web.json_response({"ok": True})


async def control_requests(request: web.Request) -> web.Response:
    state = _state(request)
    since = int(request.query.get("since", "0"))
    records = [_public(entry) for entry in state.records if entry["seq"] > since]
    return web.json_response({"requests": records, "last_seq": state.seq})


async def control_stats(request: web.Request) -> web.Response:
    state = _state(request)
    accounts = {
        account_id: {
            "requests": account.requests,
            "statuses": {str(status): count for status, count in account.statuses.items()},
            "aborted": account.aborted,
        }
        for account_id, account in state.accounts.items()
    }
    return web.json_response({"total": state.total, "accounts": accounts})


async def control_quota(request: web.Request) -> web.Response:
    state = _state(request)
    since = int(request.query.get("since", "0"))
    now = time.time()
    accounts = {
        account_id: account.ledger.snapshot(now)
        for account_id, account in state.accounts.items()
        if account.ledger is not None
    }
    timeline = [event for event in state.timeline if event["seq"] > since]
    reply = {
        "epoch": state.quota_epoch,
        "now": now,
        "accounts": accounts,
        "timeline": timeline,
        "last_seq": state.timeline_seq,
    }
    return web.Response(body=_encode(reply), content_type="application/json")


async def control_quota_start(request: web.Request) -> web.Response:
    state = _state(request)
    epoch = (await _json(request)).get("epoch")
    if epoch is None:
        epoch = int(time.time())
    if isinstance(epoch, bool) or not isinstance(epoch, int):
        raise web.HTTPBadRequest(text="epoch must be whole epoch seconds")
    state.start_quota(epoch)
    return web.json_response({"epoch": epoch})


async def control_recording(request: web.Request) -> web.Response:
    state = _state(request)
    state.recording = bool((await _json(request)).get("on", True))
    return web.json_response({"on": state.recording})


async def control_revoke(request: web.Request) -> web.Response:
    token = (await _json(request)).get("token")
    if not isinstance(token, str) or not token:
        raise web.HTTPBadRequest(text="token is required")
    _state(request).revoked.add(token)
    return web.json_response({"revoked": token})


async def control_refresh_tokens(request: web.Request) -> web.Response:
    data = await _json(request)
    token = data.get("refresh_token")
    if not isinstance(token, str) or not token:
        raise web.HTTPBadRequest(text="refresh_token is required")
    identity = Identity(
        account_id=data.get("account_id"),
        email=data.get("email", "user@example.com"),
        plan=data.get("plan", "plus"),
    )
    _state(request).identities[token] = identity
    return web.json_response(dataclasses.asdict(identity))


async def not_found(request: web.Request) -> web.Response:
    """Any other route: recorded (to see what a client tries), then 404."""
    state = _state(request)
    entry = state.record(request, request.headers.get("chatgpt-account-id"), await request.read())
    if entry:
        entry["status"] = 404
    body = _encode({"error": {"type": "not_found", "message": f"no fake for {request.path}"}})
    return web.Response(status=404, body=body, content_type="application/json")


def make_app(state: FakeState | None = None) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATE_KEY] = state if state is not None else FakeState()
    app.router.add_post("/codex/responses", responses)
    app.router.add_post("/codex/responses/compact", responses)
    app.router.add_get("/codex/models", models)
    app.router.add_post("/transcribe", transcribe)
    app.router.add_get("/wham/usage", wham_usage)
    app.router.add_post("/oauth/token", oauth_token)
    app.router.add_route("*", "/_fake/accounts/{account_id}", control_account)
    app.router.add_route("*", "/_fake/settings", control_settings)
    app.router.add_post("/_fake/reset", control_reset)
    app.router.add_get("/_fake/requests", control_requests)
    app.router.add_get("/_fake/stats", control_stats)
    app.router.add_post("/_fake/recording", control_recording)
    app.router.add_get("/_fake/quota", control_quota)
    app.router.add_post("/_fake/quota/start", control_quota_start)
    app.router.add_post("/_fake/revoke", control_revoke)
    app.router.add_post("/_fake/refresh_tokens", control_refresh_tokens)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app


# --- as a process, and driven from tests -------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class FakeUpstream:
    """A running fake: its root ``url`` and the control routes as methods (httpx, synchronous)."""

    def __init__(self, port: int, process: subprocess.Popen[bytes] | None = None):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.process = process  # set by running_fake
        self.http = httpx.Client(base_url=self.url, timeout=10)

    def _post(self, path: str, data: dict[str, Any] | None = None) -> Any:
        response = self.http.post(path, json=data or {})
        response.raise_for_status()
        return response.json()

    def configure(self, account_id: str, **behaviour: Any) -> dict[str, Any]:
        """Merge ``Behaviour`` fields into one account's behaviour; answers the whole of it."""
        return dict(self._post(f"/_fake/accounts/{account_id}", behaviour))

    def behaviour(self, account_id: str) -> dict[str, Any]:
        response = self.http.get(f"/_fake/accounts/{account_id}")
        response.raise_for_status()
        return dict(response.json())

    def settings(self, **settings: Any) -> dict[str, Any]:
        return dict(self._post("/_fake/settings", settings))

    def reset(self) -> None:
        self._post("/_fake/reset")

    def requests(self, since: int = 0, path: str | None = None) -> list[dict[str, Any]]:
        """Records after sequence number ``since``, optionally only those of one path."""
        response = self.http.get("/_fake/requests", params={"since": since})
        response.raise_for_status()
        records: list[dict[str, Any]] = response.json()["requests"]
        return [r for r in records if path is None or r["path"].split("?")[0] == path]

    def last_seq(self) -> int:
        response = self.http.get("/_fake/requests", params={"since": 1 << 62})
        response.raise_for_status()
        return int(response.json()["last_seq"])

    def stats(self) -> dict[str, Any]:
        response = self.http.get("/_fake/stats")
        response.raise_for_status()
        return dict(response.json())

    def recording(self, on: bool) -> None:
        self._post("/_fake/recording", {"on": on})

    def quota(self, since: int = 0) -> dict[str, Any]:
        """Quota mode's ground truth: ``GET /_fake/quota``."""
        response = self.http.get("/_fake/quota", params={"since": since})
        response.raise_for_status()
        return dict(response.json())

    def quota_start(self, epoch: int | None = None) -> int:
        """A new quota epoch (now, or ``epoch``): every quota afresh, the timeline emptied."""
        reply = self._post("/_fake/quota/start", {} if epoch is None else {"epoch": epoch})
        return int(reply["epoch"])

    def revoke(self, token: str) -> None:
        self._post("/_fake/revoke", {"token": token})

    def register_refresh_token(
        self,
        refresh_token: str,
        account_id: str,
        email: str = "user@example.com",
        plan: str = "plus",
    ) -> None:
        self._post(
            "/_fake/refresh_tokens",
            {
                "refresh_token": refresh_token,
                "account_id": account_id,
                "email": email,
                "plan": plan,
            },
        )

    def auth_json(self, account_id: str, **kwargs: Any) -> dict[str, Any]:
        """``tests.factories.auth_json`` for this account, its refresh token made known here."""
        kwargs.setdefault("refresh_token", f"rt-{account_id}-{secrets.token_hex(6)}")
        document = auth_json(account_id=account_id, **kwargs)
        self.register_refresh_token(
            kwargs["refresh_token"],
            account_id,
            kwargs.get("email", "user@example.com"),
            kwargs.get("plan", "plus"),
        )
        return document

    def close(self) -> None:
        self.http.close()


def _wait_ready(proc: subprocess.Popen[bytes], url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/_fake/stats", timeout=1).status_code == 200:
                return True
        time.sleep(0.05)
    raise RuntimeError(f"the fake upstream did not answer at {url} within {timeout} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def running_fake(port: int | None = None) -> Iterator[FakeUpstream]:
    """The fake as a subprocess on a loopback port (a free one unless given), while inside."""
    for _ in range(5):
        chosen = port if port is not None else _free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fake_upstream", "--port", str(chosen)],
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            ready = _wait_ready(proc, f"http://127.0.0.1:{chosen}", timeout=15)
        except BaseException:
            _stop(proc)
            raise
        if ready:
            break
        if port is not None:
            raise RuntimeError(f"the fake upstream could not start on port {port}")
    else:
        raise RuntimeError("the fake upstream could not start on a free port")
    fake = FakeUpstream(chosen, proc)
    try:
        yield fake
    finally:
        fake.close()
        _stop(proc)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--no-recording", action="store_true", help="start with recording off")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s fake_upstream %(message)s"
    )
    state = FakeState()
    state.recording = not args.no_recording
    log.info("listening on http://%s:%d", args.host, args.port)
    web.run_app(
        make_app(state),
        host=args.host,
        port=args.port,
        print=None,
        access_log=None,
        handle_signals=True,
        shutdown_timeout=1.0,
    )
    log.info("stopped")


if __name__ == "__main__":
    main()
