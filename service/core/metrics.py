"""What every layer's metrics share: the process's metrics mode, labelled children looked up
once, and the Redis error counter (the one metric of ``core`` itself).

Each layer keeps its own metric objects beside its code (``settings.metrics``,
``auth.metrics``, ``proxy.metrics``); ``ops.metrics`` serves them all at ``/metrics``.

Metrics mode: ``prometheus_client`` decides when it is first imported whether values live in
this process's memory or in files shared by the workers of one replica (its multiprocess mode,
when ``PROMETHEUS_MULTIPROC_DIR`` is set: ``server`` sets it for ``serve --workers N``). What it
decided is captured here, at the same moment, so ``/metrics`` always reads values where they
are written, whatever happens to the environment later.

Labels are bounded: route paths, statuses, account ids, strategies and causes, never a thread,
a key, a token or anything a client chooses.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import TypeVar

import prometheus_client

# Where the workers of this replica write their values; None: this process alone, in memory.
MULTIPROCESS_DIR: str | None = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None

M = TypeVar("M")


def children(labels: Callable[..., M]) -> Callable[..., M]:
    """``metric.labels`` remembered per label values: a request pays one dict lookup, not the
    label validation and lock of ``labels`` (the label sets are few, see above)."""
    cached: Callable[..., M] = functools.cache(labels)
    return cached


REDIS_ERRORS = prometheus_client.Counter(
    "codex_lb_redis_errors",
    "Redis operations that failed, by kind: unavailable (connection trouble or Redis turning "
    "the command away), error (Redis failed the command), pubsub (the subscription was lost), "
    "timeout (a lookup on a request's path gave up waiting)",
    ["kind"],
)
_redis_error = children(REDIS_ERRORS.labels)


def redis_error(kind: str) -> None:
    _redis_error(kind).inc()


def redis_timed_out(exc: BaseException) -> None:
    """Count ``exc`` if it is a deadline on a Redis call running out (``asyncio.timeout``):
    every other Redis failure was counted by ``Connection.call`` already."""
    if isinstance(exc, TimeoutError):
        redis_error("timeout")
