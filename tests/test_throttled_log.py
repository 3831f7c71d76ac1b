"""``ThrottledLog``: a warning repeated on every request is said once per interval."""

from __future__ import annotations

import logging

import pytest

from service.core.throttled_log import ThrottledLog


def test_a_repeated_warning_is_said_once_per_interval_with_the_count_held_back(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1000.0]
    monkeypatch.setattr("service.core.throttled_log.time.monotonic", lambda: now[0])
    quiet = ThrottledLog(logging.getLogger("t"), interval=30)
    with caplog.at_level(logging.WARNING, logger="t"):
        for _ in range(500):
            quiet.warning("pin lookup failed (%s)", "ConnectionError")
            now[0] += 0.01
        quiet.warning("another warning")
        now[0] += 30
        quiet.warning("pin lookup failed (%s)", "TimeoutError")
    assert [r.getMessage() for r in caplog.records] == [
        "pin lookup failed (ConnectionError)",
        "another warning",
        "pin lookup failed (TimeoutError) (and 499 more times in the last 30 s)",
    ]
