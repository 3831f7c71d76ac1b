"""``codex-lb serve|admin ...``.

Without ``CODEX_LB_REDIS_URL`` every command uses the embedded redis-server in the data dir,
starting it for the command's duration unless a running ``serve`` already has it up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Iterator

from service import __version__
from service.auth.credentials import Credentials
from service.auth.store import AuthStore
from service.config import Config, ConfigError
from service.core.connection import Connection, open_connection
from service.core.errors import ServiceError
from service.core.secret_box import EncryptionKeyError, SecretBox, load_key
from service.embedded_record import Owner
from service.embedded_redis import EmbeddedRedisError, embedded_redis
from service.logs import configure
from service.settings.domain import reset_settings
from service.settings.live import LiveSettings
from service.settings.store import SettingsStore, initial_settings

log = logging.getLogger("codex_lb")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="codex-lb", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=2455)
    serve.add_argument("--workers", type=int, default=1, help="OS worker processes")

    admin = commands.add_parser("admin", help="operator commands")
    actions = admin.add_subparsers(dest="action", required=True)
    actions.add_parser(
        "set-password",
        help="set or reset the dashboard password (read from stdin); "
        "ends all sessions and clears failed-login lockouts",
    )
    actions.add_parser("reset-totp", help="remove TOTP and the login requirement")
    actions.add_parser("bootstrap-token", help="print the first-run bootstrap token, if any")
    actions.add_parser(
        "reset-settings",
        help="write the default settings as a new version (the recovery when the settings "
        "record was lost)",
    )
    return parser


@contextlib.contextmanager
def _redis(config: Config, owner: Owner) -> Iterator[Config]:
    """The config with a Redis URL: the configured one, or the embedded server's."""
    if config.redis_url:
        yield config
        return
    with embedded_redis(config.data_dir, owner=owner) as url:
        # Worker processes read their configuration from the environment. The URL carries the
        # embedded server's password: fine there (only our user reads our environment), never
        # in a log line.
        os.environ["CODEX_LB_REDIS_URL"] = url
        yield Config.from_env()


async def _prepare(config: Config) -> str | None:
    """Check the key against the deployment and set up first-run state; what to tell the
    operator about the dashboard password, if it is not set yet. Never the token itself: a
    generated one was logged once by ``ensure_bootstrap_token``, and one from the environment
    is never printed (it would land in every pod's log)."""
    assert config.redis_url
    async with open_connection(config.redis_url, config.redis_prefix) as conn:
        creds = _credentials(conn, config)
        await creds.check_key_fingerprint()
        if await creds.password_configured():
            return None
        if await creds.ensure_bootstrap_token():
            return "set the dashboard password with the bootstrap token logged above"
        if config.bootstrap_token:
            return (
                "set the dashboard password with the bootstrap token from "
                "CODEX_LB_DASHBOARD_BOOTSTRAP_TOKEN"
            )
        return (
            "the dashboard password is not set; `codex-lb admin bootstrap-token` prints the "
            "bootstrap token"
        )


def _serve(config: Config, args: argparse.Namespace) -> int:
    from service.server import serve

    try:
        first_run = asyncio.run(_prepare(config))
    except ServiceError:
        log.warning("Redis is not reachable yet; starting anyway (not ready until it is)")
        first_run = None
    # Logged, not printed: with CODEX_LB_LOG_FORMAT=json every line of output is one object.
    log.info("codex-lb %s listening on http://%s:%s", __version__, args.host, args.port)
    if first_run:
        log.info("First run: %s", first_run)
    return serve(args.host, args.port, max(1, args.workers))


def _credentials(conn: Connection, config: Config) -> Credentials:
    box = SecretBox(load_key(config))
    return Credentials(AuthStore(conn), SettingsStore(conn), box, config.bootstrap_token)


async def _admin(config: Config, action: str) -> int:
    assert config.redis_url
    async with open_connection(config.redis_url, config.redis_prefix) as conn:
        creds = _credentials(conn, config)
        settings = creds.settings
        await creds.check_key_fingerprint()
        # An admin command may be the first thing a deployment ever runs (set-password before
        # the first serve): its state must not make the settings look lost later.
        await settings.initialise(initial_settings())
        if action == "set-password":
            password = sys.stdin.readline().rstrip("\r\n")
            if not 8 <= len(password) <= 1024:
                print("password must be 8 to 1024 characters", file=sys.stderr)
                return 2
            ended = await creds.set_password(password)
            cleared = await creds.store.clear_attempts()
            print(f"password set; {ended} session(s) ended, {cleared} lockout counter(s) cleared")
        elif action == "reset-totp":
            live = LiveSettings(settings)
            await live.sync()
            if live.settings_lost:
                print(
                    "the settings record is lost: run `codex-lb admin reset-settings` first",
                    file=sys.stderr,
                )
                return 1
            record = await creds.remove_totp(live)
            print(f"TOTP removed and not required (settings version {record.version})")
        elif action == "reset-settings":
            record = await reset_settings(settings)
            print(f"default settings written as version {record.version}")
        else:
            if await creds.password_configured():
                print("no bootstrap token: the dashboard password is already set", file=sys.stderr)
                return 1
            if config.bootstrap_token:
                # The operator supplied it, so they have it; it is never printed (§3).
                print(
                    "the bootstrap token is the one set in CODEX_LB_DASHBOARD_BOOTSTRAP_TOKEN",
                    file=sys.stderr,
                )
                return 0
            await creds.ensure_bootstrap_token()
            token = await creds.bootstrap_token()
            if token is None:
                print("no bootstrap token could be read", file=sys.stderr)
                return 1
            print(token)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = Config.from_env()
        configure(config.log_format)
        with _redis(config, "serve" if args.command == "serve" else "admin") as config:
            if args.command == "serve":
                return _serve(config, args)
            return asyncio.run(_admin(config, args.action))
    except (ConfigError, EmbeddedRedisError, EncryptionKeyError) as exc:
        print(f"codex-lb: {exc}", file=sys.stderr)
        return 1
    except ServiceError as exc:
        print(f"codex-lb: {exc.message}", file=sys.stderr)
        return 1
