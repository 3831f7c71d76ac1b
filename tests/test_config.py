"""CODEX_LB_* variables are read once, with clear errors for values we cannot use."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from service.config import Config, ConfigError


def test_defaults() -> None:
    config = Config.from_env({})
    assert config.redis_url is None
    assert config.redis_prefix == "codexlb:"
    assert config.data_dir == Path("~/.codex-lb").expanduser()
    assert config.session_idle_seconds == 7200
    assert config.session_max_seconds == 43200
    assert config.cookie_secure == "auto"
    assert config.settings_reconcile_seconds == 1.0
    assert config.upstream_base_url == "https://chatgpt.com/backend-api"
    assert config.auth_base_url == "https://auth.openai.com"
    assert config.log_format == "text"
    assert config.drain_seconds == 30.0


def test_values_are_parsed() -> None:
    config = Config.from_env(
        {
            "CODEX_LB_REDIS_URL": "redis://r:6379/1",
            "CODEX_LB_TRUSTED_PROXY_CIDRS": "10.0.0.0/8, 192.168.1.1",
            "CODEX_LB_SETTINGS_RECONCILE_SECONDS": "0.5",
            "CODEX_LB_COOKIE_SECURE": "TRUE",
            "CODEX_LB_LOG_FORMAT": "json",
            "CODEX_LB_UPSTREAM_BASE_URL": "http://127.0.0.1:9/backend-api/",
            "CODEX_LB_DRAIN_SECONDS": "0",
        }
    )
    assert config.redis_url == "redis://r:6379/1"
    assert config.trusted_proxy_cidrs == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.168.1.1/32"),
    )
    assert config.settings_reconcile_seconds == 0.5
    assert config.cookie_secure == "true"
    assert config.log_format == "json"
    assert config.upstream_base_url == "http://127.0.0.1:9/backend-api"
    assert config.drain_seconds == 0.0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SESSION_IDLE_SECONDS", "soon"),
        ("SESSION_MAX_SECONDS", "0"),
        ("COOKIE_SECURE", "maybe"),
        ("TRUSTED_PROXY_CIDRS", "not-a-network"),
        ("SETTINGS_RECONCILE_SECONDS", "-1"),
        ("LOG_FORMAT", "xml"),
        ("DRAIN_SECONDS", "-1"),
        ("DRAIN_SECONDS", "a while"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"CODEX_LB_{name}"):
        Config.from_env({f"CODEX_LB_{name}": value})


def test_ipv4_mapped_networks_are_read_as_ipv4() -> None:
    """Addresses are compared as IPv4 (CONTRACT §7), so a mapped network must be one too, or a
    local nginx listed as ``::ffff:127.0.0.1`` would still pass as a direct loopback client."""
    config = Config.from_env(
        {
            "CODEX_LB_TRUSTED_PROXY_CIDRS": "::ffff:127.0.0.1/128, ::ffff:10.0.0.0/104, ::1",
            "CODEX_LB_PROXY_UNAUTHENTICATED_CLIENT_CIDRS": "::ffff:192.168.0.0/112",
        }
    )
    assert config.trusted_proxy_cidrs == (
        ipaddress.ip_network("127.0.0.1/32"),
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert config.proxy_unauthenticated_client_cidrs == (ipaddress.ip_network("192.168.0.0/16"),)
