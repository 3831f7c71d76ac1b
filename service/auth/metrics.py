"""Failed credential checks (password, bootstrap token, TOTP code), by the error answered."""

from __future__ import annotations

import prometheus_client

from service.core.metrics import children

LOGIN_FAILURES = prometheus_client.Counter(
    "codex_lb_login_failures",
    "Failed or refused credential checks, by the error answered: invalid_credentials, "
    "invalid_bootstrap_token, invalid_totp_code, or rate_limited (over the attempt limits)",
    ["code"],
)
_login_failure = children(LOGIN_FAILURES.labels)


def login_failed(code: str) -> None:
    _login_failure(code).inc()
