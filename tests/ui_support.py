"""Helpers for the dashboard's browser tests: Debian's chromium, what a page asked for and said
in its console, and TOTP codes that are never reused."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyotp
import pytest
from playwright.sync_api import ConsoleMessage, Page, Request, Response

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / ".test-output" / "ui"
# Chromium's own line for an HTTP error answer (the API's 4xx the test provokes on purpose).
FAILED_LOAD = "Failed to load resource: the server responded with a status of"


def chromium() -> str:
    """Debian's chromium: Playwright's own browser download is never used (its host is out of
    reach here and in CI). Missing, the tests fail and say how to get it, never skip."""
    path = shutil.which("chromium")
    if path is None:
        pytest.fail(
            "chromium is not installed: scripts/install installs it with apt when run as root; "
            "otherwise run `sudo apt-get install chromium` (the dashboard's browser tests need it)"
        )
    return path


@dataclass
class Watch:
    """What one test's page did: requests outside the server, console errors, error answers."""

    origin: str
    outside: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    failures: list[tuple[int, str]] = field(default_factory=list)
    expected: set[tuple[int, str]] = field(default_factory=set)

    def expect(self, status: int, path: str) -> None:
        """An error answer the test provokes on purpose (wrong password, a 409...)."""
        self.expected.add((status, path))

    def on_request(self, request: Request) -> None:
        url = request.url
        if not (url.startswith(self.origin + "/") or url.startswith("data:")):
            self.outside.append(url)

    def on_response(self, response: Response) -> None:
        if response.status >= 400:
            path = response.url[len(self.origin) :].split("?")[0]
            self.failures.append((response.status, path))

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.console_errors.append(message.text)

    def on_page_error(self, error: Exception) -> None:
        self.console_errors.append(f"uncaught: {error}")

    def attach(self, page: Page) -> None:
        page.on("request", self.on_request)
        page.on("response", self.on_response)
        page.on("console", self.on_console)
        page.on("pageerror", self.on_page_error)

    def detach(self, page: Page) -> None:
        page.remove_listener("request", self.on_request)
        page.remove_listener("response", self.on_response)
        page.remove_listener("console", self.on_console)
        page.remove_listener("pageerror", self.on_page_error)

    def check(self) -> None:
        assert self.outside == [], f"requests outside the server: {self.outside}"
        unexpected = [f for f in self.failures if f not in self.expected]
        assert unexpected == [], f"error answers the test did not provoke: {unexpected}"
        others = [m for m in self.console_errors if not m.startswith(FAILED_LOAD)]
        assert others == [], f"console errors: {others}"
        # Each of chromium's "failed to load" lines is one of the provoked answers.
        assert len(self.console_errors) <= len(self.failures)


class Codes:
    """TOTP codes for one secret, each from a later time step than the last one used: the
    server accepts a step once and only a later one after it (CONTRACT §3). It accepts steps
    within ±1 of now, so three codes fit in one step and a test rarely waits (the previous step
    only while more than 5 s of this one are left, so it cannot expire on the way)."""

    def __init__(self) -> None:
        self.secret: str | None = None
        self.last_step = 0

    def next(self) -> str:
        assert self.secret is not None, "TOTP is not set up yet"
        totp = pyotp.TOTP(self.secret)
        while True:
            now = time.time()
            now_step = int(now // 30)
            earliest = now_step - 1 if 30 - now % 30 > 5 else now_step
            step = max(earliest, self.last_step + 1)
            if step <= now_step + 1:
                self.last_step = step
                return totp.at(step * 30)
            time.sleep(0.5)
