"""``/api/settings``: read, write (compare-and-set on the version), propagation, history."""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass

import msgspec
from msgspec import UNSET
from starlette.requests import Request
from starlette.responses import Response

from service.core.bodies import json_response, read_json, rfc3339
from service.core.endpoints import Endpoint
from service.core.errors import InvalidTotpConfig, SettingsConflict
from service.core.workers import WorkerRegistry
from service.settings.domain import apply_update, read_settings, write_settings
from service.settings.live import LiveSettings
from service.settings.schemas import (
    PropagationView,
    SettingsChange,
    SettingsHistory,
    SettingsUpdate,
    SettingsView,
    WorkerView,
)
from service.settings.store import SettingsRecord, SettingsStore

PROPAGATION_WAIT_SECONDS = 2.0
PROPAGATION_POLL_SECONDS = 0.002

_update_decoder = msgspec.json.Decoder(SettingsUpdate)
_IF_MATCH = re.compile(r'^\s*(?:W/)?"(\d+)"\s*$')


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


async def wait_for_propagation(workers: WorkerRegistry, version: int) -> tuple[int, int]:
    """Wait until every live process reports ``version`` (or the deadline); (applied, live)."""
    deadline = time.monotonic() + PROPAGATION_WAIT_SECONDS
    while True:
        live = await workers.live()
        applied = sum(1 for w in live if w.applied_version >= version)
        if applied == len(live) or time.monotonic() >= deadline:
            return applied, len(live)
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


@dataclass(frozen=True)
class SettingsRoutes:
    store: SettingsStore
    live: LiveSettings
    workers: WorkerRegistry

    async def get_settings(self, request: Request) -> Response:
        return _settings_response(await read_settings(self.store, self.live))

    async def put_settings(self, request: Request) -> Response:
        update = await read_json(request, _update_decoder)
        expected = _expected_version(request, update)
        record = await write_settings(
            self.store, self.live, lambda current: apply_update(current, update), expected
        )
        headers = {}
        if request.query_params.get("wait", "").lower() in ("1", "true", "yes"):
            applied, live = await wait_for_propagation(self.workers, record.version)
            headers["X-Propagation"] = f"{applied}/{live}"
        return _settings_response(record, headers)

    async def get_propagation(self, request: Request) -> Response:
        record = await read_settings(self.store, self.live)
        workers = await self.workers.live()
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

    async def get_history(self, request: Request) -> Response:
        entries = await self.store.history()
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
        SettingsRoutes.get_settings,
        "Current settings",
        "settings",
        response=SettingsView,
        headers={"ETag": '"<version>"'},
    ),
    Endpoint(
        "PUT",
        "/api/settings",
        SettingsRoutes.put_settings,
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
        SettingsRoutes.get_propagation,
        "Which version every live process has applied",
        "settings",
        response=PropagationView,
    ),
    Endpoint(
        "GET",
        "/api/settings/history",
        SettingsRoutes.get_history,
        "Settings changes, newest first",
        "settings",
        response=SettingsHistory,
    ),
]
