"""Fixtures: one real redis-server for the run, a fresh key prefix per test, the app in-process;
and the run's secret-leak check over every log line (``tests/leaks.py``)."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import redis

from service.app import Parts, create_app
from service.config import Config
from service.logs import TEXT_FORMAT, RequestIdFilter
from tests import leaks
from tests.fake_upstream import FakeUpstream, running_fake
from tests.support import BOOTSTRAP_TOKEN, ENCRYPTION_KEY, PASSWORD, RedisServer

IN_PROCESS_LOG = "in-process.log"
_run: dict[str, object] = {}


def pytest_configure(config: pytest.Config) -> None:
    """The run directory, the fixed secrets, and the in-process app's log lines captured there
    at the service's own level (INFO; httpx at WARNING), as production writes them."""
    where = os.environ.get(leaks.RUN_DIR_ENV)
    _run["own"] = where is None
    if where is None:
        where = tempfile.mkdtemp(prefix="codexlb-test-run-")
        os.environ[leaks.RUN_DIR_ENV] = where
    for secret, kind in (
        (PASSWORD, "dashboard password"),
        (BOOTSTRAP_TOKEN, "bootstrap token"),
        (ENCRYPTION_KEY, "encryption key"),
    ):
        leaks.register(secret, kind)
    leaks.watch_http()
    handler = logging.FileHandler(Path(where) / IN_PROCESS_LOG, encoding="utf-8")
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _run["handler"] = handler


@pytest.hookimpl(tryfirst=True)  # before pytest removes any temporary directory
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    where = leaks.run_dir()
    if where is None:
        return
    found = leaks.check_run(where)
    if found:
        text = f"{leaks.report(found)}\n(the run's logs and registry are kept in {where})"
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(text, red=True, bold=True)
        else:
            print(text, file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    elif _run.get("own"):
        shutil.rmtree(where, ignore_errors=True)


def pytest_unconfigure(config: pytest.Config) -> None:
    handler = _run.pop("handler", None)
    if isinstance(handler, logging.Handler):
        logging.getLogger().removeHandler(handler)
        handler.close()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """scripts/test starts the run's redis-server and names it; plain pytest starts its own."""
    url = os.environ.get("CODEX_LB_TEST_REDIS_URL")
    if url:
        yield url
        return
    server = RedisServer().start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def prefix() -> str:
    return f"test:{uuid.uuid4().hex[:12]}:"


@pytest.fixture
def raw_redis(redis_url: str, prefix: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        client.delete(key)
    client.close()


def make_config(redis_url: str, prefix: str, data_dir: Path, **overrides: object) -> Config:
    values: dict[str, object] = {
        "redis_url": redis_url,
        "redis_prefix": prefix,
        "data_dir": data_dir,
        "bootstrap_token": BOOTSTRAP_TOKEN,
        "encryption_key": ENCRYPTION_KEY,
        "settings_reconcile_seconds": 1.0,
    }
    values.update(overrides)
    return Config(**values)  # type: ignore[arg-type]


@pytest.fixture
def config(redis_url: str, prefix: str, tmp_path: Path, raw_redis: redis.Redis) -> Config:
    return make_config(redis_url, prefix, tmp_path)


# The fake upstream, one process per test module (reset for each test), and a config pointing
# the app's upstream and auth server at it.
@pytest.fixture(scope="module")
def fake_process() -> Iterator[FakeUpstream]:
    with running_fake() as fake:
        yield fake


@pytest.fixture
def fake(fake_process: FakeUpstream) -> FakeUpstream:
    fake_process.reset()
    return fake_process


@pytest.fixture
def proxy_config(
    redis_url: str, prefix: str, tmp_path: Path, raw_redis: redis.Redis, fake: FakeUpstream
) -> Config:
    return make_config(
        redis_url, prefix, tmp_path, upstream_base_url=fake.url, auth_base_url=fake.url
    )


class AppHarness:
    """The app inside its lifespan, reached through httpx over ASGI."""

    def __init__(self, config: Config):
        self.config = config
        self.app = create_app(config)
        self._lifespan = self.app.router.lifespan_context(self.app)

    async def __aenter__(self) -> AppHarness:
        await self._lifespan.__aenter__()
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://testserver"
        )
        for _ in range(500):
            if self.parts.settings.current is not None:
                break
            await asyncio.sleep(0.01)
        # The other copies load right after; a test may keep one from loading on purpose.
        for _ in range(100):
            if self.parts.hub.ready:
                break
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.aclose()
        await self._lifespan.__aexit__(None, None, None)

    @property
    def parts(self) -> Parts:
        parts: Parts = self.app.state.parts
        return parts


@pytest.fixture
async def harness(config: Config) -> AsyncIterator[AppHarness]:
    async with AppHarness(config) as h:
        yield h


@pytest.fixture
async def client(harness: AppHarness) -> httpx.AsyncClient:
    """A client with no session."""
    return harness.client


async def setup_password(client: httpx.AsyncClient, password: str = PASSWORD) -> httpx.Response:
    r = await client.post(
        "/api/dashboard-auth/password/setup",
        json={"password": password, "bootstrap_token": BOOTSTRAP_TOKEN},
    )
    assert r.status_code == 200, r.text
    return r


@pytest.fixture
async def admin(harness: AppHarness) -> httpx.AsyncClient:
    """A client logged in with a full dashboard session."""
    await setup_password(harness.client)
    return harness.client
