"""The run's secret-leak check (tests/leaks.py) finds what it must, and truly fails a run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from tests import leaks

ROOT = Path(__file__).resolve().parent.parent
SECRET = "planted-secret-0123456789abcdef"


def test_a_registered_secret_is_found_and_masked(tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    log.write_text(f"fine\nINFO refreshed with {SECRET} oops\nfine\n")
    found = leaks.find_leaks([log], {SECRET: "refresh token"})
    assert [(f.line, f.kind) for f in found] == [(2, "refresh token")]
    assert SECRET not in str(found[0])
    assert SECRET[:4] in str(found[0])


def test_shapes_are_secrets_whoever_made_them(tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhY2Nlc3MtMSJ9.c2lnbmF0dXJl"
    key = "sk-clb-" + "A1b2C3d4" * 6
    log.write_text(f"a {jwt}\nb {key}\nc rt-fake-12-0123456789abcdef\nd sk-clb-AbCd (prefix)\n")
    found = leaks.find_leaks([log], {})
    assert [(f.line, f.kind) for f in found] == [
        (1, "JWT"),
        (2, "API key"),
        (3, "fake refresh token"),
    ]


def test_a_totp_code_counts_only_as_a_number_of_its_own(tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    log.write_text(
        "at 2026-01-01T10:00:00.123456Z\n"  # a time's fraction
        "worker host:123456:ab\n"  # inside an id
        "code 123456 refused\n"
    )
    found = leaks.find_leaks([log], {"123456": "request code"})
    assert [(f.line, f.kind) for f in found] == [(3, "request code")]


def test_http_exchanges_register_their_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(leaks.RUN_DIR_ENV, str(tmp_path))
    request = httpx.Request(
        "POST",
        "http://t/api/dashboard-auth/password/login",
        json={"password": "hunter2-password", "nested": {"code": "654321"}},
        headers={"Authorization": "Bearer sk-clb-bearer-value"},
    )
    response = httpx.Response(
        200,
        json={"key": "sk-clb-created-key", "name": "not-a-secret", "secret": "JBSWY3DPEHPK3PXP"},
        headers={"set-cookie": "dashboard_session=cookie-value-123; Path=/"},
        request=request,
    )
    leaks.harvest(request, response)
    assert leaks.read_secrets(tmp_path) == {
        "sk-clb-bearer-value": "bearer token",
        "hunter2-password": "request password",
        "654321": "request code",
        "cookie-value-123": "cookie dashboard_session",
        "sk-clb-created-key": "response key",
        "JBSWY3DPEHPK3PXP": "response secret",
    }


def _inner_run(tmp_path: Path, leak: bool) -> subprocess.CompletedProcess[str]:
    """A whole pytest run using this suite's hooks, whose one test logs a registered secret
    (or not), with its own run directory."""
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text(
        "from tests.conftest import pytest_configure, pytest_sessionfinish, pytest_unconfigure\n"
    )
    logged = f"'{SECRET}'" if leak else "'nothing secret'"
    (suite / "test_plant.py").write_text(
        textwrap.dedent(f"""
            import logging
            from tests import leaks

            def test_plant():
                leaks.register({SECRET!r}, "planted token")
                logging.getLogger("service.planted").info("value: %s", {logged})
        """)
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = {**os.environ, leaks.RUN_DIR_ENV: str(run_dir), "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(suite)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_run_whose_logs_hold_a_secret_fails(tmp_path: Path) -> None:
    run = _inner_run(tmp_path, leak=True)
    out = run.stdout + run.stderr
    assert run.returncode == pytest.ExitCode.TESTS_FAILED, out
    assert "1 passed" in out  # the test itself passed: the check failed the run
    assert "1 secret(s) found in the logs of this test run" in out
    assert "in-process.log:1: planted token (plan... 31 chars)" in out
    assert SECRET not in out


def test_a_clean_run_passes(tmp_path: Path) -> None:
    run = _inner_run(tmp_path, leak=False)
    assert run.returncode == 0, run.stdout + run.stderr
