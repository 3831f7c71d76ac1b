"""What the upstream says about an account's limits, read from a response: the ``x-codex-*``
headers, a ``codex.rate_limits`` stream event, a 429 body.

A window is told apart by its length, not by the name it comes under: plans with one window
send the weekly one as "primary". The shorter of two windows (or a lone window shorter than a
day) is kept as the 5-hour one (``primary_*`` of ``Usage``), the longer as the weekly one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from service.accounts.domain import Usage

# A lone window at least this long is the weekly one (the 5-hour window is 300 minutes).
_LONG_WINDOW_MINUTES = 24 * 60


@dataclass(frozen=True, slots=True)
class _Window:
    used_percent: float
    minutes: int | None
    reset_at: float | None


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _window(used: Any, minutes: Any, reset_at: Any, reset_after: Any, now: float) -> _Window | None:
    percent = _number(used)
    if percent is None:
        return None
    length = _number(minutes)
    at = _number(reset_at)
    if at is None and (after := _number(reset_after)) is not None:
        at = now + after
    return _Window(percent, None if length is None else int(length), at)


def _usage(windows: list[_Window], now: float) -> Usage | None:
    if not windows:
        return None
    short: _Window | None = None
    long: _Window | None = None
    if len(windows) == 1:
        (only,) = windows
        if only.minutes is not None and only.minutes >= _LONG_WINDOW_MINUTES:
            long = only
        else:
            short = only
    else:
        # Unknown lengths keep the order the upstream named them in (primary first).
        first, second = windows[0], windows[1]
        if (first.minutes or 0) > (second.minutes or 0) and second.minutes is not None:
            first, second = second, first
        short, long = first, second

    def seconds(w: _Window | None) -> int | None:
        return None if w is None or w.minutes is None else w.minutes * 60

    return Usage(
        primary_used_percent=None if short is None else short.used_percent,
        primary_reset_at=None if short is None else short.reset_at,
        primary_window_seconds=seconds(short),
        secondary_used_percent=None if long is None else long.used_percent,
        secondary_reset_at=None if long is None else long.reset_at,
        secondary_window_seconds=seconds(long),
        updated_at=now,
    )


def from_headers(headers: Mapping[str, str], now: float) -> Usage | None:
    """The windows in a response's ``x-codex-*`` headers, or None when it has none."""
    windows = []
    for name in ("primary", "secondary"):
        prefix = f"x-codex-{name}-"
        w = _window(
            headers.get(prefix + "used-percent"),
            headers.get(prefix + "window-minutes"),
            headers.get(prefix + "reset-at"),
            headers.get(prefix + "reset-after-seconds"),
            now,
        )
        if w is not None:
            windows.append(w)
    return _usage(windows, now)


class _EventWindow(msgspec.Struct):
    used_percent: Any = None
    window_minutes: Any = None
    resets_at: Any = None
    reset_at: Any = None
    resets_in_seconds: Any = None
    reset_after_seconds: Any = None


class _RateLimits(msgspec.Struct):
    primary: _EventWindow | None = None
    secondary: _EventWindow | None = None


class _RateLimitsEvent(msgspec.Struct):
    rate_limits: _RateLimits | None = None


_event_decoder = msgspec.json.Decoder(_RateLimitsEvent)


def from_event(data: bytes, now: float) -> Usage | None:
    """The windows in a ``codex.rate_limits`` event's data, or None when unreadable."""
    try:
        limits = _event_decoder.decode(data).rate_limits
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if limits is None:
        return None
    windows = []
    for ew in (limits.primary, limits.secondary):
        if ew is None:
            continue
        w = _window(
            ew.used_percent,
            ew.window_minutes,
            ew.resets_at if ew.resets_at is not None else ew.reset_at,
            ew.resets_in_seconds if ew.resets_in_seconds is not None else ew.reset_after_seconds,
            now,
        )
        if w is not None:
            windows.append(w)
    return _usage(windows, now)


class _LimitError(msgspec.Struct):
    type: Any = None
    code: Any = None
    resets_at: Any = None
    resets_in_seconds: Any = None


class _LimitBody(msgspec.Struct):
    error: _LimitError | None = None


_limit_decoder = msgspec.json.Decoder(_LimitBody)


def limit_resets_at(body: bytes, now: float) -> float | None:
    """When a 429 body says the limit lifts (epoch seconds), if it says."""
    try:
        error = _limit_decoder.decode(body).error
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if error is None:
        return None
    at = _number(error.resets_at)
    if at is None and (after := _number(error.resets_in_seconds)) is not None:
        at = now + after
    return at
