"""Stopping background tasks for sure.

On Python 3.11 ``asyncio.wait_for`` swallows a cancel that lands as its inner operation
completes: the task gets the result instead of the CancelledError and carries on with its loop.
Redis calls made through ``Connection.call`` re-raise such a lost cancel themselves, but not
everything a background task awaits goes through it (pub/sub reads, our own ``wait_for`` in the
request-log writer). So a single ``cancel()`` followed by an unbounded wait can hang for ever,
and a bounded one can leave the task running on a closed connection: a task is stopped by
cancelling it again until it ends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

# How long a cancel is given before the next one: a swallowed cancel lets the task run only up
# to its next await, so this is long enough and keeps a stop prompt.
RECANCEL_SECONDS = 0.05


async def cancel_and_wait(
    tasks: Iterable[asyncio.Task[Any]], seconds: float
) -> set[asyncio.Task[Any]]:
    """Cancel ``tasks`` (again while they run) for up to ``seconds``; those still running."""
    pending = {task for task in tasks if not task.done()}
    deadline = time.monotonic() + seconds
    while pending:
        for task in pending:
            task.cancel()
        left = deadline - time.monotonic()
        if left <= 0:
            break
        _, pending = await asyncio.wait(pending, timeout=min(RECANCEL_SECONDS, left))
    return pending
