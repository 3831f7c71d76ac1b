"""Records kept in Redis and sent over pub/sub.

Unlike request bodies these tolerate unknown fields and give every newer field a default:
during a rolling deploy old and new pods read each other's records.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import msgspec


class SettingsRecord(msgspec.Struct, kw_only=True, frozen=True):
    version: int
    # Epoch seconds at which the write committed.
    changed_at: float
    sticky_threads_enabled: bool = True
    prefer_earlier_reset_accounts: bool = False
    # A plain string, not the enum: a newer pod may know a strategy this one does not.
    routing_strategy: str = "usage_weighted"
    import_without_overwrite: bool = False
    # No defaults for the two that guard access: a stored record that does not say is refused
    # as unreadable, never read as "off".
    totp_required_on_login: bool
    totp_configured: bool = False
    api_key_auth_enabled: bool


# The fields a settings change compares and reports in its history.
SETTINGS_FIELDS: tuple[str, ...] = tuple(
    f for f in SettingsRecord.__struct_fields__ if f not in ("version", "changed_at")
)


def initial_settings() -> SettingsRecord:
    """The record a brand-new deployment starts with (never a fallback for a lost one)."""
    return SettingsRecord(
        version=1, changed_at=time.time(), totp_required_on_login=False, api_key_auth_enabled=False
    )


class HistoryEntry(msgspec.Struct, kw_only=True, frozen=True):
    version: int
    changed_at: float
    changed_fields: list[str] = []


class WorkerRecord(msgspec.Struct, kw_only=True, frozen=True):
    worker_id: str
    host: str
    pid: int
    applied_version: int
    applied_at: float
    last_seen: float


class SessionRecord(msgspec.Struct, kw_only=True, frozen=True):
    created_at: float
    expires_at: float
    totp_pending: bool


def rfc3339(epoch: float) -> str:
    """UTC, microsecond precision, ``Z`` suffix."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
