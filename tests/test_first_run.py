"""CONTRACT §3: the first-run bootstrap token in the logs of real ``codex-lb serve`` processes.

An operator-supplied token is never printed or logged (it would land in every pod's log); a
generated one is logged once, by the process that generated it."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.support import BOOTSTRAP_TOKEN, PASSWORD, ServeProcess, base_env


def started(env: dict[str, str], log_dir: Path) -> str:
    """Start a serve process, wait until ready, stop it; its whole log."""
    proc = ServeProcess(env, log_dir=log_dir)
    try:
        proc.wait_ready()
    finally:
        assert proc.terminate() == 0
    return proc.log()


def test_token_from_the_environment_is_never_printed(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    env = base_env(redis_url, prefix, tmp_path)
    for _ in range(2):
        log = started(env, tmp_path)
        assert BOOTSTRAP_TOKEN not in log
        assert "First run: set the dashboard password with the bootstrap token from " in log
        assert "CODEX_LB_DASHBOARD_BOOTSTRAP_TOKEN" in log


def test_generated_token_is_logged_once_by_the_process_that_made_it(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    env = base_env(redis_url, prefix, tmp_path)
    del env["CODEX_LB_DASHBOARD_BOOTSTRAP_TOKEN"]
    first = started(env, tmp_path)
    lines = [line for line in first.splitlines() if "bootstrap token is " in line]
    assert len(lines) == 1, first
    token = lines[0].rsplit(" ", 1)[1]
    assert first.count(token) == 1, first

    # Started again before anyone set the password: the token is not logged again.
    second = started(env, tmp_path)
    assert token not in second
    assert "`codex-lb admin bootstrap-token` prints the bootstrap token" in second

    proc = ServeProcess(env, log_dir=tmp_path)
    try:
        proc.wait_ready()
        r = httpx.post(
            f"{proc.url}/api/dashboard-auth/password/setup",
            json={"password": PASSWORD, "bootstrap_token": token},
        )
        assert r.status_code == 200, r.text
    finally:
        assert proc.terminate() == 0
    assert token not in proc.log()
    assert "First run" not in started(env, tmp_path)
