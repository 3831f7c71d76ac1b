"""Configuration, read once from the ``CODEX_LB_*`` environment at start-up.

Runtime state (connections, live copies) lives elsewhere; this is plain data.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import msgspec

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_UPSTREAM_BASE_URL = "https://chatgpt.com/backend-api"
DEFAULT_AUTH_BASE_URL = "https://auth.openai.com"


_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def ipv4_if_mapped(net: Network) -> Network:
    """``::ffff:a.b.c.d/N`` as the IPv4 network it means: addresses are compared as IPv4, so
    a mapped network would otherwise match nothing (CONTRACT §7)."""
    if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(_MAPPED) and net.prefixlen >= 96:
        mapped = net.network_address.ipv4_mapped
        assert mapped is not None
        return ipaddress.IPv4Network((mapped, net.prefixlen - 96))
    return net


class ConfigError(ValueError):
    """A ``CODEX_LB_*`` variable has a value we cannot use."""


class Config(msgspec.Struct, frozen=True, kw_only=True):
    redis_url: str | None = None
    redis_prefix: str = "codexlb:"
    data_dir: Path = Path("~/.codex-lb").expanduser()
    bootstrap_token: str | None = None
    encryption_key: str | None = None
    encryption_key_file: Path | None = None
    upstream_base_url: str = DEFAULT_UPSTREAM_BASE_URL
    auth_base_url: str = DEFAULT_AUTH_BASE_URL
    session_idle_seconds: int = 7200
    session_max_seconds: int = 43200
    cookie_secure: Literal["auto", "true", "false"] = "auto"
    trusted_proxy_cidrs: tuple[Network, ...] = ()
    proxy_unauthenticated_client_cidrs: tuple[Network, ...] = ()
    settings_reconcile_seconds: float = 1.0
    log_format: Literal["text", "json"] = "text"
    request_log_max: int = 100_000
    # SIGTERM: how long in-flight requests may take to finish before the process exits anyway.
    drain_seconds: float = 30.0
    # Not from the environment: the upstream's usage windows are polled once a minute; tests
    # shorten it.
    usage_poll_seconds: float = 60.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        env = os.environ if env is None else env

        def get(name: str) -> str | None:
            value = env.get(f"CODEX_LB_{name}", "").strip()
            return value or None

        def number(name: str, default: float, *, minimum: float) -> float:
            raw = get(name)
            if raw is None:
                return default
            try:
                value = float(raw)
            except ValueError:
                raise ConfigError(f"CODEX_LB_{name} must be a number, got {raw!r}") from None
            if value < minimum:
                raise ConfigError(f"CODEX_LB_{name} must be at least {minimum}, got {raw!r}")
            return value

        def whole(name: str, default: int) -> int:
            value = number(name, default, minimum=0)
            if value != int(value):
                raise ConfigError(f"CODEX_LB_{name} must be a whole number, got {get(name)!r}")
            return int(value)

        def choice(name: str, allowed: tuple[str, ...], default: str) -> str:
            raw = (get(name) or default).lower()
            if raw not in allowed:
                raise ConfigError(f"CODEX_LB_{name} must be one of {', '.join(allowed)}")
            return raw

        def cidrs(name: str) -> tuple[Network, ...]:
            raw = get(name) or ""
            try:
                return tuple(
                    ipv4_if_mapped(ipaddress.ip_network(part.strip(), strict=False))
                    for part in raw.split(",")
                    if part.strip()
                )
            except ValueError as exc:
                raise ConfigError(f"CODEX_LB_{name}: {exc}") from None

        key_file = get("ENCRYPTION_KEY_FILE")
        return cls(
            redis_url=get("REDIS_URL"),
            redis_prefix=get("REDIS_PREFIX") or "codexlb:",
            data_dir=Path(get("DATA_DIR") or "~/.codex-lb").expanduser(),
            bootstrap_token=get("DASHBOARD_BOOTSTRAP_TOKEN"),
            encryption_key=get("ENCRYPTION_KEY"),
            encryption_key_file=Path(key_file).expanduser() if key_file else None,
            upstream_base_url=(get("UPSTREAM_BASE_URL") or DEFAULT_UPSTREAM_BASE_URL).rstrip("/"),
            auth_base_url=(get("AUTH_BASE_URL") or DEFAULT_AUTH_BASE_URL).rstrip("/"),
            session_idle_seconds=int(number("SESSION_IDLE_SECONDS", 7200, minimum=1)),
            session_max_seconds=int(number("SESSION_MAX_SECONDS", 43200, minimum=1)),
            cookie_secure=choice("COOKIE_SECURE", ("auto", "true", "false"), "auto"),  # type: ignore[arg-type]
            trusted_proxy_cidrs=cidrs("TRUSTED_PROXY_CIDRS"),
            proxy_unauthenticated_client_cidrs=cidrs("PROXY_UNAUTHENTICATED_CLIENT_CIDRS"),
            settings_reconcile_seconds=number("SETTINGS_RECONCILE_SECONDS", 1.0, minimum=0.05),
            log_format=choice("LOG_FORMAT", ("text", "json"), "text"),  # type: ignore[arg-type]
            request_log_max=whole("REQUEST_LOG_MAX", 100_000),
            drain_seconds=number("DRAIN_SECONDS", 30.0, minimum=0),
        )
