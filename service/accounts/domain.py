"""An account as this process sees it: the record decoded from its stored hash."""

from __future__ import annotations

import logging

import msgspec

from service.accounts.store import Fields


class Usage(msgspec.Struct, kw_only=True, frozen=True):
    """The two upstream windows as last polled (tolerant: stored JSON may be older or newer)."""

    primary_used_percent: float | None = None
    primary_reset_at: float | None = None
    primary_window_seconds: int | None = None
    secondary_used_percent: float | None = None
    secondary_reset_at: float | None = None
    secondary_window_seconds: int | None = None
    updated_at: float | None = None


_usage = msgspec.json.Decoder(Usage)
log = logging.getLogger(__name__)


class AccountState(msgspec.Struct, kw_only=True, frozen=True):
    id: str
    chatgpt_account_id: str
    email: str
    plan_type: str | None
    status: str
    created_at: float
    sealed_tokens: bytes
    tokens_version: int
    usage: Usage
    last_used_at: float | None

    @classmethod
    def from_fields(cls, f: Fields) -> AccountState:
        """Raises ``MalformedAccount`` for a hash that lacks what an account needs. A missing
        ``status`` is not "active": an account that does not say it may serve, does not."""
        try:
            return cls(
                id=f["id"],
                chatgpt_account_id=f["chatgpt_account_id"],
                email=f["email"],
                plan_type=f.get("plan_type") or None,
                status=f.get("status") or UNKNOWN_STATUS,
                created_at=float(f.get("created_at") or 0),
                sealed_tokens=f["tokens"].encode(),
                tokens_version=int(f.get("tokens_version") or 0),
                usage=_usage.decode(f.get("usage") or "{}"),
                last_used_at=float(f["last_used_at"]) if f.get("last_used_at") else None,
            )
        except KeyError as exc:
            raise MalformedAccount(f"missing field {exc}") from None
        except (ValueError, msgspec.DecodeError) as exc:
            raise MalformedAccount(str(exc)) from None


class MalformedAccount(ValueError):
    """A stored account hash that cannot be read as an account."""


UNKNOWN_STATUS = "unknown"


def parse_account(account_id: str, fields: Fields | None) -> AccountState | None:
    """The account, or None for a deleted one or one that cannot be read: that one is skipped
    with a warning naming it, so it never stops the other accounts (or copies) from loading."""
    if fields is None:
        return None
    try:
        return AccountState.from_fields(fields)
    except MalformedAccount as exc:
        log.warning("skipped the malformed account %r: %s", account_id, exc)
        return None
