"""Our request id (CONTRACT §8): every response carries ``x-codex-lb-request-id``, whichever
layer answers it, and the log lines written while handling the request name the same id (JSON
logs too); a proxy failover's log line names the upstream's ``x-request-id``."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from service.app import Service
from service.core.request_ids import HEADER, RequestIds, current_request_id
from service.logs import TEXT_FORMAT, JsonFormatter, RequestIdFilter
from tests.client_support import Deployment
from tests.conftest import AppHarness
from tests.fake_upstream import running_fake
from tests.proxy_support import RESPONSES, body, event_names
from tests.support import ServeProcess, base_env, wait_until

ID = re.compile(r"[0-9a-f]{16}")


def our_id(response: httpx.Response) -> str:
    value = response.headers.get(HEADER, "")
    assert ID.fullmatch(value), response.headers
    return value


async def test_every_layer_answers_with_an_id(harness: AppHarness) -> None:
    client = harness.client
    answers = [
        await client.get("/health/live"),  # the router
        await client.get("/api/settings"),  # the dashboard guard's 401
        await client.get("/no/such/route"),  # the 404 handler
        await client.delete("/health/live"),  # the 405 handler
        await client.post(RESPONSES, json=body()),  # the proxy lane (no account: an error)
        await client.get("/v1/models"),  # the API-key gate's route
    ]
    assert [r.status_code for r in answers][:4] == [200, 401, 404, 405]
    assert answers[4].json()["error"]  # the OpenAI envelope, from the lane
    ids = [our_id(r) for r in answers]
    assert len(set(ids)) == len(ids)


async def test_a_client_cannot_choose_the_id(harness: AppHarness) -> None:
    forged = "0123456789abcdef"
    r = await harness.client.get("/health/live", headers={HEADER: forged})
    assert our_id(r) != forged
    assert r.headers.get_list(HEADER) == [our_id(r)]


async def test_an_unexpected_error_has_an_id_too() -> None:
    """Starlette's outermost error layer answers a 500 itself: the id is outside it."""

    async def boom(request: Request) -> Response:
        raise RuntimeError("bug")

    app = Service(routes=[Route("/boom", boom)])
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.get("/boom")
    assert r.status_code == 500
    our_id(r)


async def test_log_lines_of_a_request_name_its_id() -> None:
    seen: list[str | None] = []

    async def handler(scope: Scope, receive: Receive, send: Send) -> None:
        logging.getLogger("service.test").warning("handling")
        seen.append(current_request_id())
        await Response("ok")(scope, receive, send)

    stream = io.StringIO()
    out = logging.StreamHandler(stream)
    out.addFilter(RequestIdFilter())
    out.setFormatter(JsonFormatter())
    logger = logging.getLogger("service.test")
    logger.addHandler(out)
    try:
        transport = httpx.ASGITransport(app=RequestIds(handler))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            r = await client.get("/")
        logger.warning("outside any request")
    finally:
        logger.removeHandler(out)
    inside, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert inside["request_id"] == our_id(r) == seen[0]
    assert inside["message"] == "handling"
    assert "request_id" not in outside
    assert current_request_id() is None


def test_text_lines_name_the_id_when_there_is_one() -> None:
    formatter = logging.Formatter(TEXT_FORMAT)
    record = logging.LogRecord("service.x", logging.INFO, __file__, 1, "hello", None, None)
    RequestIdFilter().filter(record)
    assert "request_id=" not in formatter.format(record)
    record.request_id, record.request_tag = "00ff", " request_id=00ff"
    assert formatter.format(record).endswith("request_id=00ff hello")


@pytest.fixture
def json_deployment(
    redis_url: str, prefix: str, tmp_path: Path, raw_redis: redis.Redis
) -> Iterator[Deployment]:
    with running_fake() as fake:
        env = base_env(
            redis_url,
            prefix,
            tmp_path,
            CODEX_LB_UPSTREAM_BASE_URL=fake.url,
            CODEX_LB_AUTH_BASE_URL=fake.url,
            CODEX_LB_LOG_FORMAT="json",
        )
        serve = ServeProcess(env, log_dir=tmp_path)
        try:
            serve.wait_ready()
            d = Deployment(serve, fake)
            d.login()
            d.add_accounts("a", "b")
            d.warm_up()
            yield d
            d.close()
        finally:
            serve.terminate(20)


def log_lines(serve: ServeProcess) -> list[dict[str, Any]]:
    """Every line of the process's log, each of which must be one JSON object."""
    return [json.loads(line) for line in serve.log().splitlines() if line.strip()]


def test_a_failover_is_logged_with_both_ids(json_deployment: Deployment) -> None:
    """Account a answers 500: the request fails over to b, streams to its end, and the log line
    of the failover names our id (the one the client got) and the upstream's."""
    d = json_deployment
    d.fake.configure("a", fail=500)
    ids: list[str] = []
    for _ in range(4):  # round robin: a comes within two requests
        with d.http.stream("POST", RESPONSES, json=body()) as r:
            raw = r.read()
        assert r.status_code == 200, raw
        assert "response.completed" in event_names(raw)
        assert r.headers["x-request-id"].startswith("req_")  # the upstream's, as it is
        ids.append(our_id(r))

    def failover_line() -> dict[str, Any] | None:
        lines = [e for e in log_lines(d.serve) if "cooling down" in e["message"]]
        return lines[0] if lines else None

    assert wait_until(lambda: failover_line() is not None, timeout=5)
    line = failover_line()
    assert line is not None
    assert line["request_id"] in ids
    assert re.search(r"upstream x-request-id req_\w+", line["message"]), line
    # Lines outside any request (start-up) carry no id.
    assert any("request_id" not in e for e in log_lines(d.serve))
