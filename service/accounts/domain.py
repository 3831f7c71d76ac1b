"""An account as this process sees it: the cold record and the hot state, and what they mean.

The cold record (identity, sealed tokens, the operator's status) changes rarely and is kept
versioned (``store``, ``live``). The hot state (usage windows with their reset times,
cooldown, consecutive failures, last use) changes with traffic and is kept apart (``hot``):
last writer wins by the time each part was observed, with no global version, so learning
usage never rewrites or republishes a record holding tokens.
"""

from __future__ import annotations

import logging

import msgspec

from service.accounts.store import Fields

log = logging.getLogger(__name__)

# The operator's statuses, kept in the cold record. "rate_limited" and "quota_exceeded" are not
# stored: they are read from the hot state (``status``).
ACTIVE, PAUSED, REAUTH_REQUIRED = "active", "paused", "reauth_required"
UNKNOWN_STATUS = "unknown"
# Written by pods from before the hot state existed; the hot state now says it.
_LEARNED_STATUSES = frozenset({"rate_limited", "quota_exceeded"})


class AccountState(msgspec.Struct, kw_only=True, frozen=True):
    """The cold record."""

    id: str
    chatgpt_account_id: str
    email: str
    plan_type: str | None
    status: str
    created_at: float
    sealed_tokens: bytes
    tokens_version: int

    @classmethod
    def from_fields(cls, f: Fields) -> AccountState:
        """Raises ``MalformedAccount`` for a hash that lacks what an account needs. A missing
        ``status`` is not "active": an account that does not say it may serve, does not."""
        status = f.get("status") or UNKNOWN_STATUS
        try:
            return cls(
                id=f["id"],
                chatgpt_account_id=f["chatgpt_account_id"],
                email=f["email"],
                plan_type=f.get("plan_type") or None,
                status=ACTIVE if status in _LEARNED_STATUSES else status,
                created_at=float(f.get("created_at") or 0),
                sealed_tokens=f["tokens"].encode(),
                tokens_version=int(f.get("tokens_version") or 0),
            )
        except KeyError as exc:
            raise MalformedAccount(f"missing field {exc}") from None
        except ValueError as exc:
            raise MalformedAccount(str(exc)) from None


class MalformedAccount(ValueError):
    """A stored account hash that cannot be read as an account."""


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


# --- hot state ----------------------------------------------------------------------------------


class Usage(msgspec.Struct, kw_only=True, frozen=True):
    """The two upstream windows as last learned (tolerant: stored JSON may be older or newer)."""

    primary_used_percent: float | None = None
    primary_reset_at: float | None = None
    primary_window_seconds: int | None = None
    secondary_used_percent: float | None = None
    secondary_reset_at: float | None = None
    secondary_window_seconds: int | None = None
    # The upstream said the limit is reached (in a body, or its headers), whatever the percents.
    limit_reached: bool = False
    updated_at: float | None = None


class Cooldown(msgspec.Struct, kw_only=True, frozen=True):
    until: float | None = None
    failures: int = 0
    # The upstream said the usage limit is reached (a 429), rather than failing (5xx, no
    # answer): a pool held back only by failures is "no account", not "usage limit".
    limited: bool = False


class HotState(msgspec.Struct, kw_only=True, frozen=True):
    """What traffic teaches about an account. Each part carries the time it was observed
    (``*_at``); merging two states keeps the newer of each part, so the order in which
    processes learn, publish and read does not matter."""

    usage: Usage = Usage()
    usage_at: float = 0.0
    cooldown: Cooldown = Cooldown()
    cooldown_at: float = 0.0
    last_used_at: float = 0.0

    def merged(self, other: HotState) -> HotState:
        usage = self if self.usage_at >= other.usage_at else other
        cooldown = self if self.cooldown_at >= other.cooldown_at else other
        return HotState(
            usage=usage.usage,
            usage_at=usage.usage_at,
            cooldown=cooldown.cooldown,
            cooldown_at=cooldown.cooldown_at,
            last_used_at=max(self.last_used_at, other.last_used_at),
        )


NO_STATE = HotState()
# The parts of a hot state, as stored: each is a hash field with its clock in ``<part>_at``.
PARTS = ("usage", "cooldown", "last_used")
_usage_decoder = msgspec.json.Decoder(Usage)
_cooldown_decoder = msgspec.json.Decoder(Cooldown)


def parse_state(fields: Fields) -> HotState:
    """Raises ``MalformedAccount`` for a part that cannot be read."""
    try:
        return HotState(
            usage=_usage_decoder.decode(fields.get("usage") or "{}"),
            usage_at=float(fields.get("usage_at") or 0),
            cooldown=_cooldown_decoder.decode(fields.get("cooldown") or "{}"),
            cooldown_at=float(fields.get("cooldown_at") or 0),
            last_used_at=float(fields.get("last_used_at") or 0),
        )
    except (ValueError, msgspec.DecodeError) as exc:
        raise MalformedAccount(str(exc)) from None


def status(account: AccountState, hot: HotState, now: float) -> str:
    """The status the dashboard shows: the operator's, or, for an active account, what the
    upstream last said (a weekly window at 100 %: ``quota_exceeded``; the 5-hour window at 100 %,
    a reached limit or a cooldown: ``rate_limited``)."""
    if account.status != ACTIVE:
        return account.status
    usage = hot.usage
    if _full(usage.secondary_used_percent, usage.secondary_reset_at, now):
        return "quota_exceeded"
    limited = usage.limit_reached and not _passed(usage.primary_reset_at, now)
    if limited or _full(usage.primary_used_percent, usage.primary_reset_at, now):
        return "rate_limited"
    if hot.cooldown.until is not None and hot.cooldown.until > now:
        return "rate_limited"
    return ACTIVE


def _passed(reset_at: float | None, now: float) -> bool:
    return reset_at is not None and reset_at <= now


def _full(used_percent: float | None, reset_at: float | None, now: float) -> bool:
    """At 100 % and not reset since (a window whose reset time has passed is fresh again)."""
    return used_percent is not None and used_percent >= 100 and not _passed(reset_at, now)
