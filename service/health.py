"""``/health/live`` and ``/health/ready``.

Ready means: this process has a settings record to serve with, and every other live copy (API
keys, accounts) has loaded once. That stays true while Redis is down (last-known-good, reported
as degraded); it is false before the first load, while the settings record is lost (an operator
must run ``codex-lb admin reset-settings``), and while the process drains for shutdown.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from service.http import json_response
from service.routing import Endpoint
from service.schemas import LiveView, ReadyView
from service.state import services


async def live(request: Request) -> Response:
    return json_response(LiveView(status="ok"))


async def ready(request: Request) -> Response:
    svc = services(request)
    record = svc.live.current
    redis = "ok" if svc.live.redis_ok else "unavailable"
    version = None if record is None else record.version
    if not svc.live.ready or svc.draining:
        if svc.draining:
            status = "draining"
        elif svc.live.settings_lost:
            status = "settings_lost"
        else:
            status = "starting"
        return json_response(ReadyView(status=status, settings_version=version, redis=redis), 503)
    status = "ready" if svc.live.redis_ok else "degraded"
    return json_response(ReadyView(status=status, settings_version=version, redis=redis))


ENDPOINTS = [
    Endpoint(
        "GET",
        "/health/live",
        live,
        "The process is up",
        "operations",
        response=LiveView,
        auth="none",
        store=False,
    ),
    Endpoint(
        "GET",
        "/health/ready",
        ready,
        "Settings loaded and not draining",
        "operations",
        response=ReadyView,
        auth="none",
        store=False,
        # Starting or draining: the same body, with the status saying "not ready".
        other_responses={503: ReadyView},
    ),
]
