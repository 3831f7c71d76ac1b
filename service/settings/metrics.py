"""The settings a process serves with, as metrics: the version applied and how long each change
took to reach this process.

The lag runs from the write's own commit time (``SettingsRecord.changed_at``, set by the process
that wrote it) to this process applying it, so it measures the whole way (pub/sub, or the
reconcile loop when a message was lost), not just the handling of a message. It is observed
only for a change that arrives while the process runs: the first record a process loads was
written before it started. Clocks of different hosts may differ a little; a negative lag counts
as zero.
"""

from __future__ import annotations

import prometheus_client

SETTINGS_VERSION = prometheus_client.Gauge(
    "codex_lb_settings_version",
    "The settings version applied (with several workers: the oldest any live worker applied)",
    # The laggard is what an operator looks for; a dead worker's value goes with it.
    multiprocess_mode="livemin",
)
PROPAGATION = prometheus_client.Histogram(
    "codex_lb_settings_propagation_seconds",
    "From a settings write committing to this process applying it",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)


def applied(version: int, lag_seconds: float | None) -> None:
    """A version was applied; ``lag_seconds`` since its write, None for the first load."""
    SETTINGS_VERSION.set(version)
    if lag_seconds is not None:
        PROPAGATION.observe(max(0.0, lag_seconds))
