"""The proxy's readers: usage windows from headers and events, 429 bodies, SSE events."""

from __future__ import annotations

from service.proxy.ratelimits import from_event, from_headers, limit_resets_at
from service.proxy.sse import EventReader, EventTap, parse_event

NOW = 1_800_000_000.0


def test_headers_give_both_windows_classified_by_length() -> None:
    usage = from_headers(
        {
            "x-codex-primary-used-percent": "12.5",
            "x-codex-primary-window-minutes": "300",
            "x-codex-primary-reset-at": str(int(NOW + 600)),
            "x-codex-secondary-used-percent": "40",
            "x-codex-secondary-window-minutes": "10080",
            "x-codex-secondary-reset-after-seconds": "7200",
        },
        NOW,
    )
    assert usage is not None
    assert (usage.primary_used_percent, usage.primary_reset_at) == (12.5, NOW + 600)
    assert usage.primary_window_seconds == 18000
    assert (usage.secondary_used_percent, usage.secondary_reset_at) == (40, NOW + 7200)
    assert usage.secondary_window_seconds == 604800


def test_a_lone_weekly_window_sent_as_primary_is_the_weekly_one() -> None:
    usage = from_headers(
        {
            "x-codex-primary-used-percent": "70",
            "x-codex-primary-window-minutes": "10080",
            "x-codex-primary-reset-at": str(int(NOW + 86400)),
        },
        NOW,
    )
    assert usage is not None
    assert usage.primary_used_percent is None
    assert (usage.secondary_used_percent, usage.secondary_reset_at) == (70, NOW + 86400)


def test_swapped_windows_are_put_back_by_length() -> None:
    usage = from_headers(
        {
            "x-codex-primary-used-percent": "5",
            "x-codex-primary-window-minutes": "10080",
            "x-codex-secondary-used-percent": "60",
            "x-codex-secondary-window-minutes": "300",
        },
        NOW,
    )
    assert usage is not None
    assert (usage.primary_used_percent, usage.secondary_used_percent) == (60, 5)


def test_no_or_garbled_headers_teach_nothing() -> None:
    assert from_headers({}, NOW) is None
    assert from_headers({"x-codex-primary-used-percent": "lots"}, NOW) is None


def test_rate_limits_event() -> None:
    data = (
        b'{"type":"codex.rate_limits","rate_limits":{"primary":{"used_percent":33,'
        b'"window_minutes":300,"resets_at":1800000300},"secondary":{"used_percent":8,'
        b'"window_minutes":10080,"resets_in_seconds":100}}}'
    )
    usage = from_event(data, NOW)
    assert usage is not None
    assert (usage.primary_used_percent, usage.primary_reset_at) == (33, 1800000300)
    assert (usage.secondary_used_percent, usage.secondary_reset_at) == (8, NOW + 100)
    assert from_event(b"not json", NOW) is None
    assert from_event(b'{"rate_limits": 5}', NOW) is None


def test_limit_body() -> None:
    body = b'{"error":{"type":"usage_limit_reached","resets_at":1800003600,"resets_in_seconds":9}}'
    assert limit_resets_at(body, NOW) == 1800003600
    assert limit_resets_at(b'{"error":{"resets_in_seconds":60}}', NOW) == NOW + 60
    assert limit_resets_at(b"<html>", NOW) is None
    assert limit_resets_at(b'{"error":"x"}', NOW) is None


STREAM = (
    b"event: response.created\ndata: {}\n\n"
    b'event: codex.rate_limits\ndata: {"a":1}\n\n'
    b'event: response.output_text.delta\ndata: {"delta":"hi"}\n\n'
    b'event: response.completed\ndata: {"done":true}\n\n'
)


def test_the_tap_finds_only_its_events_however_the_bytes_are_cut() -> None:
    for size in (1, 3, 7, 20, len(STREAM)):
        tap = EventTap(["codex.rate_limits", "response.completed"])
        found = []
        for i in range(0, len(STREAM), size):
            found += tap.feed(STREAM[i : i + size])
        assert found == [
            ("codex.rate_limits", b'{"a":1}'),
            ("response.completed", b'{"done":true}'),
        ]


def test_the_reader_reads_every_event_and_crlf() -> None:
    reader = EventReader()
    crlf = STREAM.replace(b"\n", b"\r\n")
    events = reader.feed(crlf[:50]) + reader.feed(crlf[50:]) + reader.close()
    assert [name for name, _ in events] == [
        "response.created",
        "codex.rate_limits",
        "response.output_text.delta",
        "response.completed",
    ]
    assert parse_event(b"data: x\ndata: y") == ("message", b"x\ny")
