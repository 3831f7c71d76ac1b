"""What a running process holds: made once in the app's lifespan, reached by every route."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from starlette.requests import Request

if TYPE_CHECKING:  # the modules below reach their routes' Services through this one
    import httpx

    from service.accounts.live import LiveAccounts
    from service.accounts.tokens import TokenManager
    from service.api_keys import LiveApiKeys
    from service.config import Config
    from service.live import LiveSettings
    from service.redis_accounts import AccountStore
    from service.redis_store import Store
    from service.secret_box import SecretBox


@dataclass
class Services:
    config: Config
    store: Store
    live: LiveSettings
    box: SecretBox
    http: httpx.AsyncClient
    api_keys: LiveApiKeys
    account_store: AccountStore
    accounts: LiveAccounts
    tokens: TokenManager
    draining: bool = False


def services(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc
