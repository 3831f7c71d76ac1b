"""Requests left in an account's windows, learned from the rises of its used percent; and the
learner that feeds them (use never goes back within a window)."""

from __future__ import annotations

from service.accounts.domain import Usage
from service.accounts.hot import HotStore, LiveAccountStates
from service.core.connection import Connection, connect
from service.proxy.balancer import Candidate, Pool, saturated
from service.proxy.learning import Learner
from service.proxy.units import UnitSteps, common_step

NOW = 1_800_000_000.0
RESET = NOW + 600
WEEK = NOW + 86400


def usage(short: float, weekly: float = 0.0, reset: float = RESET) -> Usage:
    return Usage(
        primary_used_percent=short,
        primary_reset_at=reset,
        secondary_used_percent=weekly,
        secondary_reset_at=WEEK,
    )


def test_every_percent_is_a_whole_number_of_one_requests_cost() -> None:
    steps = UnitSteps()
    assert steps.remaining("a", usage(50), NOW) is None  # nothing seen yet
    steps.observe("a", None, usage(50))
    assert steps.remaining("a", usage(50), NOW) is None  # one percent alone is no step
    steps.observe("a", usage(50), usage(55, 1))
    steps.observe("a", usage(55, 1), usage(57.5, 1.5))
    # 42.5 % left at 2.5 % a request in the short window; 98.5 % at 0.5 % in the weekly one.
    assert steps.remaining("a", usage(57.5, 1.5), NOW) == 17
    assert steps.remaining("a", usage(97.5, 1.5), NOW) == 1
    assert steps.remaining("a", usage(100, 1.5), NOW) == 0
    # The weekly window can be the tighter one.
    assert steps.remaining("a", usage(10, 99), NOW) == 2


def test_noise_teaches_no_step_and_a_passed_reset_says_nothing() -> None:
    steps = UnitSteps()
    steps.observe("a", usage(5), usage(5.001))  # rounding noise: still one percent
    assert steps.remaining("a", usage(5), NOW) is None
    # Percents of another window count too: each is a whole number of steps.
    steps.observe("a", usage(90), usage(5, reset=RESET + 3600))
    assert steps.remaining("a", usage(10), NOW) == 18
    # Once its window's reset time has passed, the old percent says nothing.
    assert steps.remaining("a", usage(10), RESET + 1) is None


def test_answers_spanning_several_requests_still_teach_one_requests_cost() -> None:
    # Seen from several processes, or in batched writes, answers jump by several requests:
    # 32 and 35 requests of a 40-request window rise by 7.5, yet share only 2.5.
    steps = UnitSteps()
    steps.observe("a", usage(80), usage(87.5))
    assert steps.remaining("a", usage(87.5), NOW) == 5
    # A 45-request window: percents that are not round in binary still share their step.
    steps.observe("b", usage(100 * 14 / 45), usage(100 * 21 / 45))
    assert steps.remaining("b", usage(100 * 21 / 45), NOW) == 3  # 7 requests apart, for now
    steps.observe("b", usage(100 * 21 / 45), usage(100 * 26 / 45))
    assert steps.remaining("b", usage(100 * 26 / 45), NOW) == 19
    # Coarsely rounded percents can only shrink the step, never below the noise floor.
    assert common_step(2.0, 3.0) == 1.0
    assert common_step(28.89, 15.56) >= 0.01


def test_an_account_with_its_last_units_in_flight_is_saturated() -> None:
    pool = Pool.build([Candidate("a", "active", remaining_units=2), Candidate("b", "active")], NOW)
    assert not saturated(pool, "a", 1)
    assert saturated(pool, "a", 2)
    assert not saturated(pool, "b", 1000)  # nothing known: no limit assumed


def test_answers_arriving_out_of_order_never_take_use_back() -> None:
    states = LiveAccountStates(HotStore(Connection(connect("redis://127.0.0.1:9"), "unused:")))
    learner = Learner(states, states.store, UnitSteps())
    learner.usage("a", usage(60, 20), NOW)
    learner.usage("a", usage(57.5, 19), NOW + 0.01)  # sent earlier, answered later
    known = states.get("a").usage
    assert (known.primary_used_percent, known.secondary_used_percent) == (60, 20)
    # A new window starts low, and that is believed.
    learner.usage("a", usage(2.5, 21, reset=RESET + 18000), NOW + 1)
    assert states.get("a").usage.primary_used_percent == 2.5
