"""API keys: how a key is made and judged, and the views the dashboard sees.

A key is ``sk-clb-`` + 43 url-safe characters (256 random bits), shown once at creation; only
its SHA-256 is stored. A change reaches every process through pub/sub at once (and through the
reconcile loop within a second if the message is lost); expiry is checked against the clock.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from datetime import UTC

from service.api_keys.schemas import ApiKeyCreate, ApiKeyCreated, ApiKeyView
from service.api_keys.store import ApiKeyRecord, ApiKeyStore
from service.core.bodies import rfc3339
from service.core.errors import ValidationFailed

KEY_PREFIX = "sk-clb-"


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def view(record: ApiKeyRecord) -> ApiKeyView:
    return ApiKeyView(
        id=record.id,
        name=record.name,
        key_prefix=record.key_prefix,
        created_at=record.created_at,
        expires_at=record.expires_at,
        is_active=record.is_active,
    )


def valid_name(value: str) -> str:
    name = value.strip()
    if not name:
        raise ValidationFailed("name must not be blank - at `$.name`")
    return name


async def create_key(store: ApiKeyStore, body: ApiKeyCreate) -> ApiKeyCreated:
    expires_at = None
    if body.expires_at is not None:
        try:
            # Near 9999-12-31 the UTC instant (or a float round trip) can fall past year 9999.
            expires = body.expires_at.astimezone(UTC)
        except OverflowError:
            raise ValidationFailed("expires_at is out of range - at `$.expires_at`") from None
        if expires.timestamp() <= time.time():
            raise ValidationFailed("expires_at must be in the future - at `$.expires_at`")
        expires_at = expires.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    record = ApiKeyRecord(
        id=f"key_{secrets.token_hex(8)}",
        name=valid_name(body.name),
        key_hash=key_hash(key),
        key_prefix=key[: len(KEY_PREFIX) + 4],
        created_at=rfc3339(time.time()),
        expires_at=expires_at,
        is_active=True,
    )
    await store.create(record)
    made = view(record)
    return ApiKeyCreated(**{f: getattr(made, f) for f in made.__struct_fields__}, key=key)
