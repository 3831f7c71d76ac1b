"""Who is calling: the client address and scheme, believing forwarded headers only from
``CODEX_LB_TRUSTED_PROXY_CIDRS`` peers."""

from __future__ import annotations

import ipaddress

from starlette.requests import HTTPConnection

from service.config import Network


def _in(address: str, networks: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


def _peer(conn: HTTPConnection) -> str:
    return conn.client.host if conn.client else ""


def client_ip(conn: HTTPConnection, trusted: tuple[Network, ...]) -> str:
    """The first address, walking X-Forwarded-For from the right, that is not a trusted proxy."""
    peer = _peer(conn)
    if not _in(peer, trusted):
        return peer
    forwarded = conn.headers.get("x-forwarded-for", "")
    hops = [h.strip() for h in forwarded.split(",") if h.strip()]
    for hop in reversed(hops):
        if not _in(hop, trusted):
            return hop
    return hops[0] if hops else peer


def scheme(conn: HTTPConnection, trusted: tuple[Network, ...]) -> str:
    if _in(_peer(conn), trusted):
        proto = conn.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
        if proto in ("http", "https"):
            return proto
    return conn.url.scheme


def own_origin(conn: HTTPConnection, trusted: tuple[Network, ...]) -> str:
    host = conn.headers.get("host", "")
    return f"{scheme(conn, trusted)}://{host}".lower()
