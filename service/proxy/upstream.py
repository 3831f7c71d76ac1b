"""The upstream client of the proxy's hot path: one aiohttp session per process.

aiohttp rather than httpx here because it was measured several times faster under concurrency
on this path (see ``pyproject.toml``); httpx stays for the control-plane calls. The session
keeps no cookies (one account's must never travel with another's), never decompresses (bytes
pass through unchanged, and we ask for none so the event scanner can read them), and has no
total timeout: a stream lasts as long as the model writes, and only silence ends it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import aiohttp

import service

USER_AGENT = f"codex-lb/{service.__version__}"
# The Codex CLI's own stream idle timeout: a stream silent this long is dead.
IDLE_SECONDS = 300.0
CONNECT_SECONDS = 10.0

# Never forwarded either way (RFC 9110 §7.6.1), plus what the proxy sets itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# The client's own credentials and what identifies the client's network path stay here: the
# upstream gets the account's credentials only.
_NOT_FORWARDED = HOP_BY_HOP | {
    "host",
    "content-length",
    "authorization",
    "cookie",
    "x-api-key",
    "chatgpt-account-id",
    "accept-encoding",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-real-ip",
}
# What the upstream's answer keeps to itself: cookies (its anti-bot cookies belong to one
# account), lengths and encodings the ASGI server sets again, its own server and date.
_NOT_RETURNED = HOP_BY_HOP | {
    "set-cookie",
    "set-cookie2",
    "content-length",
    "content-encoding",
    "date",
    "server",
    "alt-svc",
}


def request_headers(
    client: Iterable[tuple[bytes, bytes]], access_token: str, chatgpt_account_id: str
) -> dict[str, str]:
    """The headers sent upstream: the client's (its thread id, ``originator``, ``version``,
    ``openai-beta``...) without its credentials or hop-by-hop ones, plus the account's."""
    out: dict[str, str] = {}
    for raw_name, raw_value in client:
        name = raw_name.decode("latin-1").lower()
        if name not in _NOT_FORWARDED:
            out[name] = raw_value.decode("latin-1")
    out["authorization"] = f"Bearer {access_token}"
    out["chatgpt-account-id"] = chatgpt_account_id
    out["accept-encoding"] = "identity"
    out.setdefault("user-agent", USER_AGENT)
    return out


def response_headers(upstream: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    """The upstream answer's headers as the client gets them (``x-codex-*``, ``x-request-id``,
    ``openai-*``, content type...)."""
    return [
        (name.lower().encode("latin-1"), value.encode("latin-1"))
        for name, value in upstream.items()
        if name.lower() not in _NOT_RETURNED
    ]


def make_session() -> aiohttp.ClientSession:
    """Made inside the running loop (the app's lifespan), closed at shutdown."""
    connector = aiohttp.TCPConnector(limit=1000, limit_per_host=0, ttl_dns_cache=300)
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=None, connect=CONNECT_SECONDS, sock_read=IDLE_SECONDS),
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
        raise_for_status=False,
    )
