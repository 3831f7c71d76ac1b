"""``/health/live`` and ``/health/ready``.

Ready means: this process has a settings record to serve with, and every other live copy (API
keys, accounts) has loaded once. That stays true while Redis is down (last-known-good, reported
as degraded); it is false before the first load, while the settings record is lost (an operator
must run ``codex-lb admin reset-settings``), and while the process drains for shutdown.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from service.core.bodies import ResponseBody, json_response
from service.core.endpoints import Endpoint
from service.core.hub import Hub
from service.settings.live import LiveSettings


class LiveView(ResponseBody):
    status: str


class ReadyView(ResponseBody):
    status: str
    settings_version: int | None
    redis: str


@dataclass(frozen=True)
class HealthRoutes:
    hub: Hub
    settings: LiveSettings

    async def live(self, request: Request) -> Response:
        return json_response(LiveView(status="ok"))

    async def ready(self, request: Request) -> Response:
        hub = self.hub
        record = self.settings.current
        redis = "ok" if hub.redis_ok else "unavailable"
        version = None if record is None else record.version
        if not hub.ready or hub.draining:
            if hub.draining:
                status = "draining"
            elif self.settings.settings_lost:
                status = "settings_lost"
            else:
                status = "starting"
            body = ReadyView(status=status, settings_version=version, redis=redis)
            return json_response(body, 503)
        status = "ready" if hub.redis_ok else "degraded"
        return json_response(ReadyView(status=status, settings_version=version, redis=redis))


ENDPOINTS = [
    Endpoint(
        "GET",
        "/health/live",
        HealthRoutes.live,
        "The process is up",
        "operations",
        response=LiveView,
        auth="none",
        store=False,
    ),
    Endpoint(
        "GET",
        "/health/ready",
        HealthRoutes.ready,
        "Settings loaded and not draining",
        "operations",
        response=ReadyView,
        auth="none",
        store=False,
        # Starting or draining: the same body, with the status saying "not ready".
        other_responses={503: ReadyView},
    ),
]
