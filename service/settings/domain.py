"""The settings' rules and their writes, shared by the routes, the auth feature (which flips
``totp_configured``) and the ``codex-lb admin`` commands.

A write reads the stored record, applies the change, and stores it with a compare-and-set on
the version it read (one Lua script that also bumps the version, records history and
publishes). A write that names a version (``If-Match`` / ``expected_version``) fails with 409
when that version is stale; one that does not is retried on a fresh read, so concurrent
writers never lose each other's fields.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec
from msgspec import UNSET

from service.core.errors import InvalidTotpConfig, SettingsConflict, StoreUnavailable
from service.settings.live import LiveSettings
from service.settings.schemas import SettingsUpdate
from service.settings.store import (
    KEEP,
    SETTINGS_FIELDS,
    Keep,
    SettingsRecord,
    SettingsStore,
    initial_settings,
)

WRITE_ATTEMPTS = 20

# What a write does to the current record (applied on a fresh read until it commits).
Edit = Callable[[SettingsRecord], SettingsRecord]


# --- rules --------------------------------------------------------------------------------


def apply_update(current: SettingsRecord, update: SettingsUpdate) -> SettingsRecord:
    """The record ``update`` asks for on top of ``current``; raises if the rules forbid it."""
    changes: dict[str, object] = {
        "sticky_threads_enabled": update.sticky_threads_enabled,
        "prefer_earlier_reset_accounts": update.prefer_earlier_reset_accounts,
    }
    for name in ("import_without_overwrite", "totp_required_on_login", "api_key_auth_enabled"):
        value = getattr(update, name)
        if value is not UNSET:
            changes[name] = value
    if update.routing_strategy is not UNSET:
        changes["routing_strategy"] = update.routing_strategy.value
    new = msgspec.structs.replace(current, **changes)
    if new.totp_required_on_login and not new.totp_configured:
        raise InvalidTotpConfig()
    return new


def changed_fields(old: SettingsRecord, new: SettingsRecord) -> list[str]:
    return [f for f in SETTINGS_FIELDS if getattr(old, f) != getattr(new, f)]


# --- reads and writes -----------------------------------------------------------------------


async def read_settings(store: SettingsStore, live: LiveSettings) -> SettingsRecord:
    """The stored record (so a GET after a PUT on any replica shows it), else last-known-good."""
    try:
        stored = await store.load()
    except StoreUnavailable:
        return live.get()
    if stored is None:
        # Lost from Redis: serve what we know and put it back; never defaults.
        known = live.get()
        await store.restore(known)
        return known
    live.apply(stored)
    known = live.get()
    return known if known.version > stored.version else stored


async def write_settings(
    store: SettingsStore,
    live: LiveSettings,
    edit: Edit,
    expected_version: int | None = None,
    *,
    totp_secret: bytes | Keep | None = KEEP,
) -> SettingsRecord:
    """Store ``edit(current)`` as the next version; see the module docstring. With
    ``totp_secret``, the sealed TOTP secret is set (or removed: None) in the same atomic step."""
    for _ in range(WRITE_ATTEMPTS):
        current = await store.load()
        if current is None:
            await store.restore(live.get())
            continue
        if expected_version is not None and current.version != expected_version:
            raise SettingsConflict(
                f"Settings are at version {current.version}, not {expected_version}"
            )
        new = msgspec.structs.replace(
            edit(current), version=current.version + 1, changed_at=time.time()
        )
        written, _ = await store.compare_and_set(
            current.version, new, changed_fields(current, new), totp_secret=totp_secret
        )
        if written:
            # This process serves its very next request with the new record.
            live.apply(new)
            return new
        if expected_version is not None:
            raise SettingsConflict()
    raise SettingsConflict("Settings are changing too fast; retry")


async def reset_settings(store: SettingsStore) -> SettingsRecord:
    """The defaults as a new version (``codex-lb admin reset-settings``): the explicit recovery
    when the record was lost, so it never happens behind an operator's back (CONTRACT §4).

    The version continues from the newest one known (the record, else the history), so no live
    copy mistakes the defaults for an older record. Whether TOTP is configured is a fact about
    the stored secret, not a setting, so it is kept.
    """
    for _ in range(WRITE_ATTEMPTS):
        current = await store.load()
        history = await store.history(1)
        base = max([0, *(h.version for h in history), *([current.version] if current else [])])
        new = msgspec.structs.replace(
            initial_settings(),
            version=base + 1,
            changed_at=time.time(),
            totp_configured=await store.has_totp_secret(),
        )
        fields = list(SETTINGS_FIELDS) if current is None else changed_fields(current, new)
        written, _ = await store.compare_and_set(
            0 if current is None else current.version, new, fields
        )
        if written:
            return new
    raise SettingsConflict("Settings are changing too fast; retry")
