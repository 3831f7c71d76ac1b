"""Cancelled tasks stop for sure, though redis-py on Python 3.11 can lose a cancel
(service/core/connection.py ``Connection.call``, service/core/tasks.py).

CI once hung for 60 s in a token refresh: the lease's renewal lost its cancel inside a Redis
call and went on renewing, and ``HeldLease.release`` waited for it for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from service.core.connection import Connection, connect
from service.core.errors import StoreUnavailable
from service.core.leases import HeldLease
from service.core.tasks import cancel_and_wait

pytestmark = pytest.mark.timeout(60)


async def test_one_cancel_stops_a_task_looping_on_real_redis_calls(
    redis_url: str, prefix: str
) -> None:
    """The real thing: a task looping on Redis calls, carrying on after StoreUnavailable as a
    lease renewal does, is cancelled once. Without Connection.call's check most such cancels
    were lost with redis-py 8.2 on 3.11 (turned into a result, or a ConnectionError that the
    client's retry hid), and the task never ended."""
    conn = Connection(connect(redis_url), prefix)
    try:
        for turn in range(200):

            async def ping_forever() -> None:
                while True:
                    with contextlib.suppress(StoreUnavailable):
                        await conn.call(conn.client.ping)

            task = asyncio.create_task(ping_forever())
            await asyncio.sleep(0.0005 * (turn % 4))
            task.cancel()
            await asyncio.wait([task], timeout=1.0)
            assert task.cancelled(), f"turn {turn}: the cancel was lost"
    finally:
        await conn.close()


async def test_a_task_that_swallows_cancels_is_cancelled_again() -> None:
    async def swallows_three_cancels() -> None:
        for _ in range(3):
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(30)
        await asyncio.sleep(30)

    task = asyncio.create_task(swallows_three_cancels())
    await asyncio.sleep(0)
    started = time.monotonic()
    assert await cancel_and_wait([task], 5.0) == set()
    assert time.monotonic() - started < 1.0
    assert task.cancelled()


async def test_a_task_that_never_stops_is_given_back_after_the_bound() -> None:
    stubborn = True

    async def eats_cancels_while_stubborn() -> None:
        while stubborn:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(30)

    task = asyncio.create_task(eats_cancels_while_stubborn())
    other = asyncio.create_task(asyncio.sleep(30))
    await asyncio.sleep(0)
    started = time.monotonic()
    assert await cancel_and_wait([task, other], 0.3) == {task}
    assert 0.3 <= time.monotonic() - started < 1.0
    assert other.cancelled()
    stubborn = False
    assert await cancel_and_wait([task], 1.0) == set()


class SwallowingLeases:
    """Leases whose renewal (a Redis call of ``call_seconds``) eats the first ``swallows``
    cancels and goes on waiting for its answer, as redis-py's write can."""

    def __init__(self, swallows: int, call_seconds: float = 30.0):
        self.swallows = swallows
        self.call_seconds = call_seconds
        self.renewals = 0
        self.released: list[str] = []

    async def acquire(self, name: str, owner: str, ttl: float) -> bool:
        return True

    async def renew(self, name: str, owner: str, ttl: float) -> bool:
        self.renewals += 1
        until = time.monotonic() + self.call_seconds
        while (left := until - time.monotonic()) > 0:
            try:
                await asyncio.sleep(left)
            except asyncio.CancelledError:
                if not self.swallows:
                    raise
                self.swallows -= 1
        return True

    async def release(self, name: str, owner: str) -> None:
        self.released.append(name)


def renewals_running() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("renew lease:")]


@pytest.mark.parametrize("swallows", [1, 5])
async def test_releasing_a_lease_ends_a_renewal_that_lost_its_cancel(swallows: int) -> None:
    leases = SwallowingLeases(swallows)
    lease = HeldLease(leases, "refresh:acc", seconds=0.9)  # type: ignore[arg-type]
    assert await lease.acquire()
    while leases.renewals == 0:
        await asyncio.sleep(0.01)  # the renewal is inside its Redis call
    started = time.monotonic()
    await asyncio.wait_for(lease.release(), 2.0)
    assert time.monotonic() - started < 0.9
    assert leases.swallows == 0
    assert renewals_running() == []
    assert leases.released == ["refresh:acc"]
    assert lease.held_until == 0.0


async def test_a_renewal_left_running_past_the_bound_ends_at_its_next_turn(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A renewal that eats every cancel for longer than the lease: release gives up waiting
    (the lease expires by itself), and the renewal, once its call returns, sees it is no longer
    the lease's and ends without renewing or claiming the lease again."""
    leases = SwallowingLeases(swallows=1000, call_seconds=0.5)
    lease = HeldLease(leases, "refresh:acc", seconds=0.15)  # type: ignore[arg-type]
    assert await lease.acquire()
    while leases.renewals == 0:
        await asyncio.sleep(0.01)
    started = time.monotonic()
    await asyncio.wait_for(lease.release(), 2.0)
    assert time.monotonic() - started < 0.4
    assert "did not stop at once" in caplog.text
    assert leases.released == ["refresh:acc"]
    await asyncio.sleep(0.6)  # its call has returned
    assert renewals_running() == []
    assert leases.renewals == 1
    assert lease.held_until == 0.0
