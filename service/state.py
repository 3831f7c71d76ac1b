"""What a running process holds: made once in the app's lifespan, reached by every route."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from service.config import Config
from service.live import LiveSettings
from service.redis_store import Store
from service.secret_box import SecretBox


@dataclass
class Services:
    config: Config
    store: Store
    live: LiveSettings
    box: SecretBox
    draining: bool = False


def services(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc
