"""Fuzz a live ``codex-lb serve`` against its own /openapi.json with schemathesis (CONTRACT §8).

    .venv/bin/python scripts/fuzz.py [schemathesis run options...]

Needs ``CODEX_LB_TEST_REDIS_URL`` (scripts/test starts that redis-server and runs this after
pytest). Starts one serve process on a free loopback port with a fresh key prefix and data dir,
sets the dashboard password with the bootstrap token, and runs every schemathesis check with
that session (settings in scripts/schemathesis.toml). Exits non-zero on any finding. The serve
process is stopped on every way out, and nothing reaches the internet: both upstreams point at
a closed loopback port, so routes that would call them fail fast.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import httpx
import redis
from cryptography.fernet import Fernet

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "scripts" / "schemathesis.toml"
# Nothing listens on the discard port: upstream calls are refused at once.
CLOSED = "http://127.0.0.1:9"
READY_SECONDS = 30.0
# A hard stop, should schemathesis run away: the fuzz step must stay well under two minutes.
FUZZ_DEADLINE_SECONDS = 110.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _terminate_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so ``finally`` blocks stop the serve process."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


@contextmanager
def serve(env: dict[str, str], port: int, log: Path) -> Iterator[None]:
    """A running ``codex-lb serve``, ready to answer; always stopped afterwards."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_ready(proc, f"http://127.0.0.1:{port}")
            yield
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_ready(proc: subprocess.Popen[bytes], base: str) -> None:
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"codex-lb serve exited early with status {proc.returncode}")
        try:
            if httpx.get(f"{base}/health/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"codex-lb serve was not ready within {READY_SECONDS:.0f} s")


def log_in(base: str, bootstrap_token: str) -> str:
    """Set the dashboard password (first run); the session token of the answer's cookie."""
    response = httpx.post(
        f"{base}/api/dashboard-auth/password/setup",
        json={"password": secrets.token_urlsafe(32), "bootstrap_token": bootstrap_token},
        headers={"Origin": base},
    )
    response.raise_for_status()
    token = response.cookies.get("dashboard_session")
    if not token:
        raise RuntimeError("password setup answered without a dashboard_session cookie")
    return token


def _jwt(claims: dict[str, object]) -> str:
    """An unsigned JWT: codex-lb reads an imported id_token, it does not verify it."""

    def part(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    return ".".join((part(b'{"alg":"none"}'), part(json.dumps(claims).encode()), "unsigned"))


def import_account(base: str, session: str) -> str:
    """Import one made-up account (its upstream is unreachable anyway); its id."""
    auth_json = {
        "tokens": {
            "id_token": _jwt(
                {
                    "email": "fuzz@example.invalid",
                    "https://api.openai.com/auth": {"chatgpt_account_id": "acct-fuzz"},
                }
            ),
            # Valid for a day: no token refresh is attempted during the run.
            "access_token": _jwt({"exp": int(time.time()) + 86400}),
            "refresh_token": "fuzz-refresh-token",
        }
    }
    response = httpx.post(
        f"{base}/api/accounts/import",
        json=auth_json,
        headers={"Origin": base},
        cookies={"dashboard_session": session},
    )
    response.raise_for_status()
    return str(response.json()["results"][0]["account"]["id"])


def fuzz(base: str, session: str, workdir: Path, extra: list[str]) -> int:
    env = {
        **os.environ,
        "CODEX_LB_FUZZ_SESSION": session,
        "CODEX_LB_FUZZ_ORIGIN": base,
        "CODEX_LB_FUZZ_ACCOUNT_ID": import_account(base, session),
    }
    command = [
        str(Path(sys.executable).parent / "schemathesis"),
        "--config-file",
        str(CONFIG),
        "run",
        f"{base}/openapi.json",
        "--checks",
        "all",
        "--no-color",
        *extra,
    ]
    try:
        # In a scratch directory: schemathesis keeps a cache in its working directory.
        run = subprocess.run(command, env=env, cwd=workdir, timeout=FUZZ_DEADLINE_SECONDS)
        return run.returncode
    except subprocess.TimeoutExpired:
        print(f"schemathesis ran over {FUZZ_DEADLINE_SECONDS:.0f} s", file=sys.stderr)
        return 1


def main(extra: list[str]) -> int:
    redis_url = os.environ.get("CODEX_LB_TEST_REDIS_URL")
    if not redis_url:
        print("CODEX_LB_TEST_REDIS_URL must name a Redis to fuzz with", file=sys.stderr)
        return 2
    _terminate_on_sigterm()
    prefix = f"fuzz:{secrets.token_hex(6)}:"
    bootstrap_token = secrets.token_urlsafe(24)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CODEX_LB_")}
    with tempfile.TemporaryDirectory(prefix="codexlb-fuzz-") as tmp:
        workdir = Path(tmp)
        env.update(
            CODEX_LB_REDIS_URL=redis_url,
            CODEX_LB_REDIS_PREFIX=prefix,
            CODEX_LB_DATA_DIR=str(workdir / "data"),
            CODEX_LB_ENCRYPTION_KEY=Fernet.generate_key().decode(),
            CODEX_LB_DASHBOARD_BOOTSTRAP_TOKEN=bootstrap_token,
            CODEX_LB_UPSTREAM_BASE_URL=CLOSED,
            CODEX_LB_AUTH_BASE_URL=CLOSED,
        )
        log = workdir / "serve.log"
        status = 1
        try:
            with serve(env, port, log):
                status = fuzz(base, log_in(base, bootstrap_token), workdir, extra)
        finally:
            if status != 0 and log.exists():
                print(f"--- codex-lb serve log ---\n{log.read_text(errors='replace')}")
            _forget(redis_url, prefix)
    return status


def _forget(redis_url: str, prefix: str) -> None:
    """Drop what the run stored, in case the Redis outlives it."""
    client = redis.Redis.from_url(redis_url)
    try:
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            client.delete(key)
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
