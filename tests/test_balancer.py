"""The balancer is a pure function of plain values; the candidates are made from the two
account copies at one instant."""

from __future__ import annotations

import time

from service.accounts.domain import AccountState, Cooldown, HotState, Usage
from service.accounts.hot import HotStore, LiveAccountStates
from service.core.connection import Connection, connect
from service.proxy.balancer import Candidate, Choice, Pin, Policy, pick
from service.proxy.candidates import candidates

STICKY = Policy("usage_weighted", prefer_earlier_reset_accounts=False, sticky_threads_enabled=True)
LOOSE = Policy("usage_weighted", prefer_earlier_reset_accounts=False, sticky_threads_enabled=False)


def test_no_eligible_account_is_no_choice() -> None:
    pool = [Candidate("a", "paused"), Candidate("b", "rate_limited")]
    assert pick(pool, STICKY, None, 0.0) is None
    assert pick([], STICKY, None, 0.0) is None


def test_only_eligible_accounts_are_picked() -> None:
    pool = [Candidate("a", "quota_exceeded"), Candidate("b", "active")]
    assert pick(pool, STICKY, None, 0.0) == Choice("b", pinned=False)


def test_a_pin_decides_while_its_account_is_eligible_and_sticky_threads_are_on() -> None:
    pool = [Candidate("a", "active"), Candidate("b", "active")]
    assert pick(pool, STICKY, Pin("thread", "b"), 0.0) == Choice("b", pinned=True)
    assert pick(pool, LOOSE, Pin("thread", "b"), 0.0) == Choice("a", pinned=False)
    blocked = [Candidate("a", "active"), Candidate("b", "rate_limited")]
    assert pick(blocked, STICKY, Pin("thread", "b"), 0.0) == Choice("a", pinned=False)


def account(account_id: str, status: str = "active") -> AccountState:
    return AccountState(
        id=account_id,
        chatgpt_account_id=f"c-{account_id}",
        email=f"{account_id}@example.com",
        plan_type="plus",
        status=status,
        created_at=0.0,
        sealed_tokens=b"",
        tokens_version=1,
    )


def test_candidates_read_both_copies_and_the_clock() -> None:
    states = LiveAccountStates(HotStore(Connection(connect("redis://127.0.0.1:9"), "unused:")))
    now = time.time()
    states.states = {
        "full": HotState(
            usage=Usage(primary_used_percent=100, primary_reset_at=now + 60), usage_at=now
        ),
        "cooling": HotState(cooldown=Cooldown(until=now + 30, failures=2), cooldown_at=now),
        "fresh": HotState(
            usage=Usage(primary_used_percent=40, primary_reset_at=now + 600), usage_at=now
        ),
    }
    pool = [account("full"), account("cooling"), account("fresh"), account("off", "paused")]
    made = {c.account_id: c for c in candidates(pool, states, now)}
    assert {i: c.status for i, c in made.items()} == {
        "full": "rate_limited",
        "cooling": "rate_limited",
        "fresh": "active",
        "off": "paused",
    }
    assert made["fresh"].primary.used_percent == 40
    # Once the known reset time passes, the full account serves again: no poll needed.
    later = {c.account_id: c.status for c in candidates(pool, states, now + 61)}
    assert later["full"] == "active"
    assert later["cooling"] == "active"
