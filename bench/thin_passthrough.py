"""The thinnest possible streaming passthrough, as a yardstick for ``bench/proxy.py``.

One Starlette route, one aiohttp session: the request's body and headers go to the upstream
named by ``CODEX_LB_BENCH_UPSTREAM``, its stream comes back as it is. No gate, no routing, no
learning, no failover: what any Python proxy on this stack pays at least, measured in the same
run as codex-lb so the two can be compared on a shared, noisy machine.

    CODEX_LB_BENCH_UPSTREAM=http://127.0.0.1:PORT python -m uvicorn bench.thin_passthrough:app
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

UPSTREAM = os.environ.get("CODEX_LB_BENCH_UPSTREAM", "http://127.0.0.1:9") + "/codex/responses"
FORWARDED = ("authorization", "chatgpt-account-id", "content-type", "accept")
_session: list[aiohttp.ClientSession] = []


async def forward(request: Request) -> Response:
    body = await request.body()
    headers = {k: v for k, v in request.headers.items() if k in FORWARDED}
    upstream = await _session[0].post(UPSTREAM, data=body, headers=headers)

    async def stream() -> AsyncIterator[bytes]:
        try:
            async for chunk in upstream.content.iter_any():
                yield chunk
        finally:
            upstream.release()

    return StreamingResponse(stream(), upstream.status, media_type=upstream.content_type)


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    _session.append(
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
        )
    )
    yield
    await _session.pop().close()


app = Starlette(
    routes=[Route("/backend-api/codex/responses", forward, methods=["POST"])], lifespan=lifespan
)
