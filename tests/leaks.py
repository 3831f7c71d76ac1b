"""The test run's secret-leak check: no log line of the run holds a secret the tests used.

Every log line is captured to a file of the run (``CODEX_LB_TEST_RUN_DIR``, made by
``conftest.pytest_configure``): the in-process app's through a handler on the root logger,
each ``serve`` process's through ``ServeProcess`` (``watch_log``). Every secret is put in the
run's registry (``secrets.tsv``) as it comes into being: the fixed ones (dashboard password,
bootstrap token, encryption key) at start, auth.json tokens by ``tests.factories``, and
whatever crosses HTTP in a test (passwords, TOTP codes and seeds, API keys, bearer tokens,
session cookies, OAuth tokens) by ``watch_http``, which sees every httpx request of the test
process. A few shapes are secrets whoever made them (JWTs, API keys, the fake's refresh
tokens). ``check_run`` then searches every captured line; ``conftest.pytest_sessionfinish``
fails the run on any hit, naming the file, line and kind but never the secret in full.

By design the first-run bootstrap token is logged when it is generated (the operator needs it):
generated ones are not registered, only the fixed one the tests pass through the environment.
``python -m tests.leaks RUN_DIR`` checks a kept run directory again.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx

RUN_DIR_ENV = "CODEX_LB_TEST_RUN_DIR"
SECRETS_FILE = "secrets.tsv"
LOGS_FILE = "logs.txt"
# Shorter values would match by chance (a TOTP code is matched as a whole number only).
MIN_SECRET_LENGTH = 6

# Secrets whoever made them: a JWT (access and id tokens), an API key, the fake's refresh token.
SHAPES = {
    "JWT": re.compile(r"eyJ[\w-]{8,}\.eyJ[\w-]{8,}\.[\w-]+"),
    "API key": re.compile(r"sk-clb-[\w-]{40,}"),
    "fake refresh token": re.compile(r"rt-fake-\d+-[0-9a-f]{16}"),
}
# A TOTP code is six digits: found only as a number of its own, not inside a time or an id.
_NUMBER = re.compile(r"(?<![\w.:-])\d{6}(?![\w.:-])")

# JSON fields that carry a secret, in what a test sends and what it is answered.
REQUEST_FIELDS = {"password", "current_password", "new_password", "code", "refresh_token"}
RESPONSE_FIELDS = {"secret", "otpauth_uri", "access_token", "refresh_token", "id_token"}


def run_dir() -> Path | None:
    value = os.environ.get(RUN_DIR_ENV)
    return Path(value) if value else None


def register(value: str | None, kind: str) -> None:
    """Remember ``value`` as a secret of this run (nothing outside a test run)."""
    where = run_dir()
    if where is None or not value or len(value) < MIN_SECRET_LENGTH:
        return
    if "\t" in value or "\n" in value or "\t" in kind:
        raise ValueError("a secret or its kind with a tab or a newline cannot be registered")
    with (where / SECRETS_FILE).open("a", encoding="utf-8") as out:
        out.write(f"{kind}\t{value}\n")


def watch_log(path: Path) -> None:
    """Search ``path`` (a log file outside the run directory) at the end of the run."""
    where = run_dir()
    if where is not None:
        with (where / LOGS_FILE).open("a", encoding="utf-8") as out:
            out.write(f"{path}\n")


# --- what crosses HTTP ------------------------------------------------------------------------


def _fields(data: Any, names: set[str]) -> Iterator[tuple[str, str]]:
    if isinstance(data, dict):
        for name, value in data.items():
            if name in names and isinstance(value, str):
                yield name, value
            else:
                yield from _fields(value, names)
    elif isinstance(data, list):
        for item in data:
            yield from _fields(item, names)


def _json(content_type: str, content: bytes) -> Any:
    if "json" not in content_type:
        return None
    try:
        return json.loads(content)
    except ValueError:
        return None


def harvest(request: httpx.Request, response: httpx.Response | None) -> None:
    """Register the secrets a request and its (read) answer carry."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        register(token.strip(), "bearer token")
    content = request.content if isinstance(request.stream, httpx.ByteStream) else b""
    content_type = request.headers.get("content-type", "")
    if "x-www-form-urlencoded" in content_type:
        for name, value in parse_qsl(content.decode("latin-1")):
            if name in REQUEST_FIELDS:
                register(value, name)
    for name, value in _fields(_json(content_type, content), REQUEST_FIELDS):
        register(value, f"request {name}")
    if response is None:
        return
    for name, value in response.cookies.items():
        register(value, f"cookie {name}")
    try:
        content = response.content
    except httpx.ResponseNotRead:  # a streamed answer, read by the test later (or never)
        return
    body = _json(response.headers.get("content-type", ""), content)
    for name, value in _fields(body, RESPONSE_FIELDS | {"key"}):
        if name != "key" or value.startswith("sk-clb-"):
            register(value, f"response {name}")


def watch_http() -> None:
    """Harvest every httpx exchange of this process (the tests' clients, and the in-process
    app's own client to the fake upstream)."""
    sync_send = httpx.Client.send
    async_send = httpx.AsyncClient.send
    if getattr(sync_send, "_harvesting", False):
        return

    def send(self: httpx.Client, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        response = sync_send(self, request, **kwargs)
        harvest(request, response)
        return response

    async def asend(
        self: httpx.AsyncClient, request: httpx.Request, **kwargs: Any
    ) -> httpx.Response:
        response = await async_send(self, request, **kwargs)
        harvest(request, response)
        return response

    send._harvesting = True  # type: ignore[attr-defined]
    httpx.Client.send = send  # type: ignore[method-assign]
    httpx.AsyncClient.send = asend  # type: ignore[method-assign]


# --- the check ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Leak:
    path: Path
    line: int
    kind: str
    hint: str  # the secret's first characters and its length, never all of it

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.kind} ({self.hint})"


def mask(secret: str) -> str:
    return f"{secret[:4]}... {len(secret)} chars"


def read_secrets(where: Path) -> dict[str, str]:
    """Secret -> kind, from the run's registry."""
    path = where / SECRETS_FILE
    if not path.exists():
        return {}
    out: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        kind, _, value = line.partition("\t")
        if value:
            out.setdefault(value, kind)
    return out


def log_files(where: Path) -> list[Path]:
    """Every log of the run: those in its directory and those it was told to watch."""
    files = sorted(where.glob("*.log"))
    listed = where / LOGS_FILE
    if listed.exists():
        files += [Path(p) for p in listed.read_text(encoding="utf-8").splitlines() if p]
    return files


def find_leaks(paths: Iterable[Path], secrets: dict[str, str]) -> list[Leak]:
    codes = {s: kind for s, kind in secrets.items() if s.isdigit()}
    texts = {s: kind for s, kind in secrets.items() if not s.isdigit()}
    leaks: list[Leak] = []
    for path in paths:
        if not path.exists():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        # Most files hold none: one substring search per secret over the whole file first,
        # then the lines only for the secrets found.
        found = [(s, kind) for s, kind in texts.items() if s in text]
        numbers = set(_NUMBER.findall(text)) & codes.keys()
        if not found and not numbers and not any(p.search(text) for p in SHAPES.values()):
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            for secret, kind in found:
                if secret in line:
                    leaks.append(Leak(path, number, kind, mask(secret)))
            for code in numbers & set(_NUMBER.findall(line)):
                leaks.append(Leak(path, number, codes[code], mask(code)))
            for kind, shape in SHAPES.items():
                match = shape.search(line)
                if match:
                    leaks.append(Leak(path, number, kind, mask(match.group())))
    return leaks


def check_run(where: Path) -> list[Leak]:
    return find_leaks(log_files(where), read_secrets(where))


def report(leaks: list[Leak], limit: int = 50) -> str:
    lines = [f"{len(leaks)} secret(s) found in the logs of this test run:"]
    lines += [f"  {leak}" for leak in leaks[:limit]]
    if len(leaks) > limit:
        lines.append(f"  ... and {len(leaks) - limit} more")
    return "\n".join(lines)


if __name__ == "__main__":
    found = check_run(Path(sys.argv[1]))
    print(report(found) if found else "no secret found in the logs")
    sys.exit(1 if found else 0)
