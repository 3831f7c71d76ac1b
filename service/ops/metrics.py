"""``GET /metrics``: every layer's metrics in the Prometheus text format (CONTRACT §8).

With ``serve --workers N`` each worker writes its values to files shared by the replica's
workers (``core.metrics``), and a scrape of any one of them reads them all: a replica is one
target, whichever worker answers. A worker that ended still counts in the totals (counters and
histograms do not go back), its gauges no longer.

Open like ``/health/*`` (outside ``/api/``, so the dashboard guard does not ask for a session):
Prometheus scrapes it without one. Nothing in it is secret: the labels are routes, statuses,
account ids, strategies and causes.
"""

from __future__ import annotations

import asyncio

import prometheus_client
from prometheus_client import multiprocess
from starlette.requests import Request
from starlette.responses import Response

from service.core.endpoints import Endpoint
from service.core.metrics import MULTIPROCESS_DIR

# The classic text format, the one ``generate_latest`` writes.
MEDIA_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def exposition() -> bytes:
    """What a scrape reads: this process's registry, or every worker's files."""
    if MULTIPROCESS_DIR is None:
        return prometheus_client.generate_latest(prometheus_client.REGISTRY)
    registry = prometheus_client.CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=MULTIPROCESS_DIR)
    return prometheus_client.generate_latest(registry)


class MetricsRoutes:
    async def metrics(self, request: Request) -> Response:
        # Off the event loop: with several workers it reads every worker's file, and the
        # streams this worker is passing on must not wait for that.
        body = await asyncio.to_thread(exposition)
        return Response(body, headers={"Content-Type": MEDIA_TYPE})


ENDPOINTS = [
    Endpoint(
        "GET",
        "/metrics",
        MetricsRoutes.metrics,
        "Metrics in the Prometheus text format, for every worker of this replica",
        "operations",
        text=MEDIA_TYPE,
        auth="none",
        store=False,
    ),
]
