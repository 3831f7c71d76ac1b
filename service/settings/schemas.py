"""Request and response bodies of ``/api/settings``."""

from __future__ import annotations

import enum
from typing import Annotated

import msgspec
from msgspec import UNSET, Meta, UnsetType

from service.core.bodies import RequestBody, ResponseBody


class RoutingStrategy(enum.StrEnum):
    USAGE_WEIGHTED = "usage_weighted"
    ROUND_ROBIN = "round_robin"


# Any JSON number without a fraction, 3.0 as well as 3: JSON Schema (and so /openapi.json) counts
# both as integers. Decoded as a float, so only up to where floats are still exact.
Version = Annotated[float, Meta(ge=0, le=2**53, multiple_of=1)]


class SettingsView(ResponseBody):
    sticky_threads_enabled: bool
    prefer_earlier_reset_accounts: bool
    routing_strategy: RoutingStrategy
    import_without_overwrite: bool
    totp_required_on_login: bool
    totp_configured: bool
    api_key_auth_enabled: bool
    version: int


class SettingsUpdate(RequestBody):
    """``PUT /api/settings``. The two booleans are required; the rest default to current."""

    sticky_threads_enabled: bool
    prefer_earlier_reset_accounts: bool
    routing_strategy: RoutingStrategy | UnsetType = UNSET
    import_without_overwrite: bool | UnsetType = UNSET
    totp_required_on_login: bool | UnsetType = UNSET
    api_key_auth_enabled: bool | UnsetType = UNSET
    expected_version: Version | UnsetType = UNSET
    # Read-only: accepted with any value and ignored, so a GET body can be sent back as is.
    totp_configured: msgspec.Raw | UnsetType = UNSET
    version: msgspec.Raw | UnsetType = UNSET


class WorkerView(ResponseBody):
    worker_id: str
    host: str
    pid: int
    applied_version: int
    applied_at: str
    last_seen: str


class PropagationView(ResponseBody):
    version: int
    workers: list[WorkerView]


class SettingsChange(ResponseBody):
    version: int
    changed_at: str
    changed_fields: list[str]


class SettingsHistory(ResponseBody):
    changes: list[SettingsChange]
