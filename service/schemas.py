"""Wire shapes: request and response bodies of the dashboard API.

Request bodies derive from ``Request``, which forbids unknown fields: a typo in a setting name
must be a 422, never a silently ignored write. Records kept in Redis are defined next to their
store and do the opposite (tolerate unknown fields), because old and new pods read each other's
data during a rolling deploy.
"""

from __future__ import annotations

import enum
from typing import Annotated

import msgspec
from msgspec import UNSET, Meta, UnsetType


class RoutingStrategy(enum.StrEnum):
    USAGE_WEIGHTED = "usage_weighted"
    ROUND_ROBIN = "round_robin"


class Request(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of every request body: strict, unknown fields are a validation error."""


class Response(msgspec.Struct, kw_only=True):
    """Base of every response body."""


Password = Annotated[str, Meta(min_length=8, max_length=1024)]
TotpCode = Annotated[str, Meta(min_length=1, max_length=16)]
# Any JSON number without a fraction, 3.0 as well as 3: JSON Schema (and so /openapi.json) counts
# both as integers. Decoded as a float, so only up to where floats are still exact.
Version = Annotated[float, Meta(ge=0, le=2**53, multiple_of=1)]
Token = Annotated[str, Meta(min_length=1, max_length=1024)]


# --- settings -------------------------------------------------------------------------------


class SettingsView(Response):
    sticky_threads_enabled: bool
    prefer_earlier_reset_accounts: bool
    routing_strategy: RoutingStrategy
    import_without_overwrite: bool
    totp_required_on_login: bool
    totp_configured: bool
    api_key_auth_enabled: bool
    version: int


class SettingsUpdate(Request):
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


class WorkerView(Response):
    worker_id: str
    host: str
    pid: int
    applied_version: int
    applied_at: str
    last_seen: str


class PropagationView(Response):
    version: int
    workers: list[WorkerView]


class SettingsChange(Response):
    version: int
    changed_at: str
    changed_fields: list[str]


class SettingsHistory(Response):
    changes: list[SettingsChange]


# --- dashboard authentication --------------------------------------------------------------


class SessionView(Response):
    authenticated: bool
    password_configured: bool
    totp_configured: bool
    totp_required_on_login: bool
    totp_pending: bool
    bootstrap_required: bool


class PasswordSetup(Request):
    password: Password
    bootstrap_token: Token


class PasswordLogin(Request):
    password: Annotated[str, Meta(max_length=1024)]


class PasswordChange(Request):
    current_password: Annotated[str, Meta(max_length=1024)]
    new_password: Password


class TotpCodeBody(Request):
    code: TotpCode


class TotpSetupView(Response):
    secret: str
    otpauth_uri: str
    qr_svg_data_uri: str


# --- operations -----------------------------------------------------------------------------


class LiveView(Response):
    status: str


class ReadyView(Response):
    status: str
    settings_version: int | None
    redis: str
