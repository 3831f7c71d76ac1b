"""The balancer alone (``service.proxy.balancer``, a pure function): ``pick`` on a built ``Pool``
and ``Pool.build`` itself, in this process, no network.

Pools of random accounts: both windows' used percent uniform in 0..100, reset times in the
next 5 h (primary) and 7 days (secondary), and one account in ten not eligible (paused,
reauth_required, rate_limited or quota_exceeded). Each figure is the median over ``RUNS`` timeit
runs of the time per call; a run lasts at least ``MIN_RUN_SECONDS``. The picks cycle through
precomputed (turn, rand) draws; the harness (a closure call and ``next`` on the cycle, about
0.1 us) is included.
"""

from __future__ import annotations

import itertools
import random
import statistics
import time
import timeit
from collections.abc import Callable
from dataclasses import dataclass

from service.proxy.balancer import ACTIVE, LIMITED, Candidate, Policy, Pool, Window, pick

SIZES = (10, 100, 1000)
# (routing_strategy, prefer_earlier_reset_accounts)
POLICIES = (
    ("usage_weighted", False),
    ("usage_weighted", True),
    ("round_robin", False),
    ("round_robin", True),
)
INELIGIBLE = ("paused", "reauth_required", "rate_limited", "quota_exceeded")
INELIGIBLE_SHARE = 0.1
RUNS = 7
MIN_RUN_SECONDS = 0.02
DRAWS = 4096
SEED = 20251120


def policy_label(strategy: str, prefer: bool) -> str:
    return f"{strategy}{' +prefer_earlier_reset' if prefer else ''}"


@dataclass
class PickFigures:
    # size -> policy label -> us per pick
    pick_us: dict[int, dict[str, float]]
    # size -> us per Pool.build
    build_us: dict[int, float]
    # size -> us per pick once one account has failed (the retry of a failover), usage_weighted
    failover_us: dict[int, float]
    eligible: dict[int, int]


def make_candidates(n: int, now: float, rng: random.Random) -> list[Candidate]:
    out = []
    for _ in range(n):
        status = rng.choice(INELIGIBLE) if rng.random() < INELIGIBLE_SHARE else ACTIVE
        primary_reset = now + rng.uniform(60, 5 * 3600)
        secondary_reset = now + rng.uniform(3600, 7 * 86400)
        out.append(
            Candidate(
                f"{rng.getrandbits(64):016x}",
                status,
                Window(rng.uniform(0, 100), primary_reset, 5 * 3600),
                Window(rng.uniform(0, 100), secondary_reset, 7 * 86400),
                available_at=secondary_reset if status in LIMITED else None,
                changes_at=min(primary_reset, secondary_reset),
            )
        )
    return out


def per_call_us(fn: Callable[[], object]) -> float:
    """Median over RUNS runs of the time per call, in microseconds."""
    timer = timeit.Timer(fn)
    number = 1
    while (took := timer.timeit(number)) < MIN_RUN_SECONDS:
        number = max(number * 2, int(number * MIN_RUN_SECONDS / max(took, 1e-9) * 1.1))
    return statistics.median(timer.repeat(repeat=RUNS, number=number)) / number * 1e6


def _picker(
    pool: Pool, policy: Policy, rng: random.Random, exclude: frozenset[str] = frozenset()
) -> Callable[[], object]:
    draws = itertools.cycle([(rng.randrange(1 << 30), rng.random()) for _ in range(DRAWS)])

    def one() -> object:
        turn, rand = next(draws)
        return pick(pool, policy, None, turn=turn, rand=lambda: rand, exclude=exclude)

    return one


def _builder(candidates: list[Candidate], now: float) -> Callable[[], object]:
    return lambda: Pool.build(candidates, now)


def measure() -> PickFigures:
    rng = random.Random(SEED)
    now = time.time()
    figures = PickFigures({}, {}, {}, {})
    for n in SIZES:
        candidates = make_candidates(n, now, rng)
        pool = Pool.build(candidates, now)
        figures.eligible[n] = len(pool.eligible.members)
        figures.build_us[n] = per_call_us(_builder(candidates, now))
        figures.pick_us[n] = {}
        for strategy, prefer in POLICIES:
            policy = Policy(strategy, prefer, sticky_threads_enabled=True)
            if _picker(pool, policy, rng)() is None:
                raise RuntimeError(f"no pick from a pool of {n} ({strategy})")
            figures.pick_us[n][policy_label(strategy, prefer)] = per_call_us(
                _picker(pool, policy, rng)
            )
        failed = frozenset({pool.eligible.members[0].account_id})
        policy = Policy("usage_weighted", False, sticky_threads_enabled=True)
        figures.failover_us[n] = per_call_us(_picker(pool, policy, rng, failed))
    return figures
