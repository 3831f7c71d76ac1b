"""The settings record: its rules, its writes, and the ``/api/settings`` routes.

A write reads the stored record, applies the change, and stores it with a compare-and-set on
the version it read (one Lua script that also bumps the version, records history and
publishes). A write that names a version (``If-Match`` / ``expected_version``) fails with 409
when that version is stale; one that does not is retried on a fresh read, so concurrent
writers never lose each other's fields.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable

import msgspec
from msgspec import UNSET
from starlette.requests import Request
from starlette.responses import Response

from service.errors import InvalidTotpConfig, SettingsConflict, StoreUnavailable
from service.http import json_response, read_json
from service.live import LiveSettings
from service.records import SETTINGS_FIELDS, SettingsRecord, initial_settings, rfc3339
from service.redis_store import KEEP, Keep, Store
from service.routing import Endpoint
from service.schemas import (
    PropagationView,
    SettingsChange,
    SettingsHistory,
    SettingsUpdate,
    SettingsView,
    WorkerView,
)
from service.state import services

WRITE_ATTEMPTS = 20
PROPAGATION_WAIT_SECONDS = 2.0
PROPAGATION_POLL_SECONDS = 0.002

_update_decoder = msgspec.json.Decoder(SettingsUpdate)
_IF_MATCH = re.compile(r'^\s*(?:W/)?"(\d+)"\s*$')

Change = Callable[[SettingsRecord], SettingsRecord]


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


def view(record: SettingsRecord) -> SettingsView:
    return SettingsView(
        sticky_threads_enabled=record.sticky_threads_enabled,
        prefer_earlier_reset_accounts=record.prefer_earlier_reset_accounts,
        routing_strategy=record.routing_strategy,  # type: ignore[arg-type]
        import_without_overwrite=record.import_without_overwrite,
        totp_required_on_login=record.totp_required_on_login,
        totp_configured=record.totp_configured,
        api_key_auth_enabled=record.api_key_auth_enabled,
        version=record.version,
    )


# --- reads and writes -----------------------------------------------------------------------


async def read_settings(store: Store, live: LiveSettings) -> SettingsRecord:
    """The stored record (so a GET after a PUT on any replica shows it), else last-known-good."""
    try:
        stored = await store.load_settings()
    except StoreUnavailable:
        return live.get()
    if stored is None:
        # Lost from Redis: serve what we know and put it back; never defaults.
        known = live.get()
        await store.restore_settings(known)
        return known
    live.apply(stored)
    known = live.get()
    return known if known.version > stored.version else stored


async def write_settings(
    store: Store,
    live: LiveSettings,
    change: Change,
    expected_version: int | None = None,
    *,
    totp_secret: bytes | Keep | None = KEEP,
) -> SettingsRecord:
    """Store ``change(current)`` as the next version; see the module docstring. With
    ``totp_secret``, the sealed TOTP secret is set (or removed: None) in the same atomic step."""
    for _ in range(WRITE_ATTEMPTS):
        current = await store.load_settings()
        if current is None:
            await store.restore_settings(live.get())
            continue
        if expected_version is not None and current.version != expected_version:
            raise SettingsConflict(
                f"Settings are at version {current.version}, not {expected_version}"
            )
        new = msgspec.structs.replace(
            change(current), version=current.version + 1, changed_at=time.time()
        )
        written, _ = await store.compare_and_set_settings(
            current.version, new, changed_fields(current, new), totp_secret=totp_secret
        )
        if written:
            # This process serves its very next request with the new record.
            live.apply(new)
            return new
        if expected_version is not None:
            raise SettingsConflict()
    raise SettingsConflict("Settings are changing too fast; retry")


async def reset_settings(store: Store) -> SettingsRecord:
    """The defaults as a new version (``codex-lb admin reset-settings``): the explicit recovery
    when the record was lost, so it never happens behind an operator's back (CONTRACT §4).

    The version continues from the newest one known (the record, else the history), so no live
    copy mistakes the defaults for an older record. Whether TOTP is configured is a fact about
    the stored secret, not a setting, so it is kept.
    """
    for _ in range(WRITE_ATTEMPTS):
        current = await store.load_settings()
        history = await store.settings_history(1)
        base = max([0, *(h.version for h in history), *([current.version] if current else [])])
        new = msgspec.structs.replace(
            initial_settings(),
            version=base + 1,
            changed_at=time.time(),
            totp_configured=await store.has_totp_secret(),
        )
        fields = list(SETTINGS_FIELDS) if current is None else changed_fields(current, new)
        written, _ = await store.compare_and_set_settings(
            0 if current is None else current.version, new, fields
        )
        if written:
            return new
    raise SettingsConflict("Settings are changing too fast; retry")


async def wait_for_propagation(store: Store, version: int) -> tuple[int, int]:
    """Wait until every live process reports ``version`` (or the deadline); (applied, live)."""
    deadline = time.monotonic() + PROPAGATION_WAIT_SECONDS
    while True:
        workers = await store.live_workers()
        applied = sum(1 for w in workers if w.applied_version >= version)
        if applied == len(workers) or time.monotonic() >= deadline:
            return applied, len(workers)
        await asyncio.sleep(PROPAGATION_POLL_SECONDS)


def _expected_version(request: Request, update: SettingsUpdate) -> int | None:
    header = request.headers.get("if-match")
    from_header: int | None = None
    if header is not None and header.strip() != "*":
        match = _IF_MATCH.match(header)
        if match is None:
            raise SettingsConflict('If-Match must be a quoted version, e.g. "3"')
        from_header = int(match.group(1))
    from_body = None if update.expected_version is UNSET else int(update.expected_version)
    if from_header is not None and from_body is not None and from_header != from_body:
        raise SettingsConflict("If-Match and expected_version name different versions")
    return from_header if from_header is not None else from_body


def _settings_response(record: SettingsRecord, headers: dict[str, str] | None = None) -> Response:
    return json_response(view(record), headers={"ETag": f'"{record.version}"', **(headers or {})})


# --- routes ---------------------------------------------------------------------------------


async def get_settings(request: Request) -> Response:
    svc = services(request)
    return _settings_response(await read_settings(svc.store, svc.live))


async def put_settings(request: Request) -> Response:
    svc = services(request)
    update = await read_json(request, _update_decoder)
    expected = _expected_version(request, update)
    record = await write_settings(
        svc.store, svc.live, lambda current: apply_update(current, update), expected
    )
    headers = {}
    if request.query_params.get("wait", "").lower() in ("1", "true", "yes"):
        applied, live = await wait_for_propagation(svc.store, record.version)
        headers["X-Propagation"] = f"{applied}/{live}"
    return _settings_response(record, headers)


async def get_propagation(request: Request) -> Response:
    svc = services(request)
    record = await read_settings(svc.store, svc.live)
    workers = await svc.store.live_workers()
    return json_response(
        PropagationView(
            version=record.version,
            workers=[
                WorkerView(
                    worker_id=w.worker_id,
                    host=w.host,
                    pid=w.pid,
                    applied_version=w.applied_version,
                    applied_at=rfc3339(w.applied_at),
                    last_seen=rfc3339(w.last_seen),
                )
                for w in workers
            ],
        )
    )


async def get_history(request: Request) -> Response:
    entries = await services(request).store.settings_history()
    changes = [
        SettingsChange(
            version=e.version, changed_at=rfc3339(e.changed_at), changed_fields=e.changed_fields
        )
        for e in entries
    ]
    return json_response(SettingsHistory(changes=changes))


ENDPOINTS = [
    Endpoint(
        "GET",
        "/api/settings",
        get_settings,
        "Current settings",
        "settings",
        response=SettingsView,
        headers={"ETag": '"<version>"'},
    ),
    Endpoint(
        "PUT",
        "/api/settings",
        put_settings,
        "Update settings",
        "settings",
        request=SettingsUpdate,
        response=SettingsView,
        errors=(InvalidTotpConfig, SettingsConflict),
        query=(("wait", "true: answer once every live process has the new version"),),
        headers={"ETag": '"<version>"', "X-Propagation": "<applied>/<live>"},
    ),
    Endpoint(
        "GET",
        "/api/settings/propagation",
        get_propagation,
        "Which version every live process has applied",
        "settings",
        response=PropagationView,
    ),
    Endpoint(
        "GET",
        "/api/settings/history",
        get_history,
        "Settings changes, newest first",
        "settings",
        response=SettingsHistory,
    ),
]
