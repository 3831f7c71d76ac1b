"""Who is calling: the client address and scheme, believing forwarded headers only from
``CODEX_LB_TRUSTED_PROXY_CIDRS`` peers (CONTRACT §7).

The client address is the socket peer, or, when the peer is a trusted proxy, the first address
from the right of ``X-Forwarded-For`` that is not a trusted proxy (the leftmost hop when all are
trusted). A trusted peer that sends no usable ``X-Forwarded-For`` has no client address at all
(``None``): the caller could be anyone behind that proxy, so it must neither count as the proxy
itself nor share one bucket with every other such caller. IPv4-mapped IPv6 addresses compare as
IPv4 everywhere.
"""

from __future__ import annotations

import functools
import ipaddress

from starlette.requests import HTTPConnection

from service.config import Network

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@functools.lru_cache(maxsize=4096)
def parse(value: str) -> Address | None:
    """``value`` as an address (``::ffff:a.b.c.d`` as ``a.b.c.d``), or None. Cached: every
    proxied request asks about the same few peers, and parsing is not free."""
    try:
        ip = ipaddress.ip_address(value.strip())
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def within(ip: Address, networks: tuple[Network, ...]) -> bool:
    return any(ip in net for net in networks)


def peer(conn: HTTPConnection) -> Address | None:
    """The socket peer's address."""
    return parse(conn.client.host) if conn.client else None


def client_address(conn: HTTPConnection, trusted: tuple[Network, ...]) -> Address | None:
    """The caller's address as far as it can be known; None when it cannot."""
    ip = peer(conn)
    if ip is None or not within(ip, trusted):
        return ip
    # Every header line counts: a proxy may append a line of its own rather than a hop.
    hops = [h for line in conn.headers.getlist("x-forwarded-for") for h in line.split(",")]
    forwarded: Address | None = None
    for hop in reversed(hops):
        forwarded = parse(hop)
        if forwarded is None:
            # Garbage (or an obfuscated identifier) where an address should be: nothing to the
            # left of it can be attributed to anyone we trust.
            return None
        if not within(forwarded, trusted):
            return forwarded
    # Every hop is in a trusted range (a client inside the cluster's own range, behind the
    # ingress): the leftmost one, as the first trusted proxy recorded it. None without hops.
    return forwarded


def direct_loopback(conn: HTTPConnection, trusted: tuple[Network, ...]) -> bool:
    """True when the socket peer itself is on this machine and is not a trusted proxy: a
    forwarded address never counts as loopback, and neither does a local reverse proxy."""
    ip = peer(conn)
    return ip is not None and ip.is_loopback and not within(ip, trusted)


def scheme(conn: HTTPConnection, trusted: tuple[Network, ...]) -> str:
    ip = peer(conn)
    if ip is not None and within(ip, trusted):
        proto = conn.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
        if proto in ("http", "https"):
            return proto
    return conn.url.scheme


def own_origin(conn: HTTPConnection, trusted: tuple[Network, ...]) -> str:
    host = conn.headers.get("host", "")
    return f"{scheme(conn, trusted)}://{host}".lower()
