"""Warnings that would repeat on every request (Redis away: each pin lookup, each turn, each
write fails alike) said at most once per interval, with how many were held back meanwhile, so
an outage leaves a readable log rather than thousands of identical lines."""

from __future__ import annotations

import logging
import math
import time

INTERVAL_SECONDS = 30.0


class ThrottledLog:
    def __init__(self, log: logging.Logger, interval: float = INTERVAL_SECONDS):
        self.log = log
        self.interval = interval
        # message -> (when it was last said, how many times it was held back since)
        self._said: dict[str, tuple[float, int]] = {}

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        last, held = self._said.get(message, (-math.inf, 0))
        if now - last < self.interval:
            self._said[message] = (last, held + 1)
            return
        self._said[message] = (now, 0)
        if held:
            message += f" (and {held} more times in the last {self.interval:.0f} s)"
        self.log.warning(message, *args)
