"""The proxy's metrics, and one small recording function for each thing the proxy does.

Every function takes plain values and costs a dict lookup (the labelled child, remembered) and
an increment or an observation: they run on every proxied request.
"""

from __future__ import annotations

import prometheus_client

from service.core.metrics import children

REQUESTS = prometheus_client.Counter(
    "codex_lb_proxy_requests",
    "Requests on the forwarded proxy routes, by route and the status answered (also those the "
    "API-key gate refused or that no account could serve)",
    ["route", "status"],
)
FIRST_BYTE = prometheus_client.Histogram(
    "codex_lb_upstream_first_byte_seconds",
    "From sending a request upstream (its account's token at hand, refreshed if it had to be) "
    "to the head of the upstream's answer, for every answer, failed over or not",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
DURATION = prometheus_client.Histogram(
    "codex_lb_upstream_duration_seconds",
    "From sending a request upstream to the end of the answer passed to the client (the whole "
    "stream for a streamed one)",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0),
)
SELECTIONS = prometheus_client.Counter(
    "codex_lb_account_selections",
    "Accounts picked to send a request to (each attempt of a failed-over request counts), by "
    "account and routing strategy",
    ["account_id", "strategy"],
)
FAILOVERS = prometheus_client.Counter(
    "codex_lb_failovers",
    "Attempts on an account that failed, so the request went on to the next account (or, with "
    "none left, failed), by cause: rate_limited (429), upstream_error (5xx), unreachable, "
    "unauthorized (401 after a token refresh), refresh_failed, reauth_required, account_gone",
    ["cause"],
)
COOLDOWNS = prometheus_client.Counter(
    "codex_lb_cooldowns",
    "Accounts put in a cooldown, by cause: rate_limited, upstream_error, unreachable, "
    "refresh_failed",
    ["cause"],
)
STICKY = prometheus_client.Counter(
    "codex_lb_sticky_routings",
    "Requests of a thread served with sticky threads on, by outcome: hit (its pin decided), new "
    "(the thread got its first pin), moved (its pinned account was paused or gone: pinned "
    "anew), detour (its pinned account is limited: served elsewhere, the pin kept)",
    ["outcome"],
)

_request = children(REQUESTS.labels)
_selected = children(SELECTIONS.labels)
_failover = children(FAILOVERS.labels)
_cooldown = children(COOLDOWNS.labels)
_sticky = children(STICKY.labels)


def request_done(route: str, status: int) -> None:
    _request(route, status).inc()


def upstream_first_byte(seconds: float) -> None:
    FIRST_BYTE.observe(seconds)


def upstream_done(seconds: float) -> None:
    DURATION.observe(seconds)


def selected(account_id: str, strategy: str) -> None:
    _selected(account_id, strategy).inc()


def failover(cause: str) -> None:
    _failover(cause).inc()


def cooldown(cause: str) -> None:
    _cooldown(cause).inc()


def sticky(*, hit: bool, had_pin: bool, moved: bool) -> None:
    """A thread's request served: ``hit`` its pin decided, ``had_pin`` it had one, ``moved``
    the pin now names the account that served it."""
    outcome = "hit" if hit else "new" if not had_pin else "moved" if moved else "detour"
    _sticky(outcome).inc()
