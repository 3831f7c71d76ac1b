"""The fault proxy itself, against the run's redis-server: what it holds, cuts, refuses and
delays is what the fault tests rely on."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from urllib.parse import urlparse

import pytest
import redis

from tests.faults.tcp_proxy import TcpProxy, proxying


@pytest.fixture
def proxy(redis_url: str) -> Iterator[TcpProxy]:
    port = urlparse(redis_url).port
    assert port is not None
    with proxying(port) as p:
        yield p


def client(proxy: TcpProxy, timeout: float = 5.0) -> redis.Redis:
    return redis.Redis.from_url(proxy.url(), socket_timeout=timeout, socket_connect_timeout=1)


def test_bytes_flow_through(proxy: TcpProxy, raw_redis: redis.Redis, prefix: str) -> None:
    c = client(proxy)
    c.set(f"{prefix}k", b"v")
    assert raw_redis.get(f"{prefix}k") == b"v"
    assert proxy.forwarded > 0
    assert proxy.connections() == 1


def test_a_pause_holds_a_command_until_resumed(
    proxy: TcpProxy, raw_redis: redis.Redis, prefix: str
) -> None:
    c = client(proxy)
    c.ping()
    proxy.pause()
    done = threading.Event()

    def write() -> None:
        c.set(f"{prefix}held", b"1")
        done.set()

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    # Held, not lost: Redis has not seen it, however long we look.
    assert not done.wait(0.5)
    assert raw_redis.get(f"{prefix}held") is None
    proxy.resume()
    assert done.wait(5)
    assert raw_redis.get(f"{prefix}held") == b"1"


def test_a_pause_holds_new_connections_too(proxy: TcpProxy) -> None:
    proxy.pause()
    c = client(proxy, timeout=0.3)
    with pytest.raises(redis.TimeoutError):
        c.ping()
    proxy.resume()
    assert client(proxy).ping()


def test_a_refusing_drop_cuts_every_connection_and_refuses_new_ones(proxy: TcpProxy) -> None:
    c = client(proxy)
    c.ping()
    assert proxy.drop(refuse=True) == 1
    with pytest.raises(redis.ConnectionError):
        c.ping()  # the old connection is cut, the client's reconnect is refused
    with pytest.raises(redis.ConnectionError):
        client(proxy).ping()
    proxy.restore()
    assert client(proxy).ping()
    assert c.ping()


def test_dropping_subscribers_loses_their_held_messages_and_nothing_else(
    proxy: TcpProxy, prefix: str
) -> None:
    plain = client(proxy)
    plain.ping()
    sub = client(proxy).pubsub()
    sub.subscribe(f"{prefix}ch")
    assert sub.get_message(timeout=2)["type"] == "subscribe"  # type: ignore[index]
    assert proxy.connections("subscribers") == 1
    proxy.pause("subscribers")
    assert plain.publish(f"{prefix}ch", b"lost") == 1  # delivered into the held link
    assert proxy.drop("subscribers") == 1
    assert plain.ping()  # the other connection never noticed
    proxy.resume()
    seen = []
    deadline = time.monotonic() + 1
    while time.monotonic() < deadline:
        try:
            message = sub.get_message(timeout=0.1)
        except redis.ConnectionError:
            continue  # the cut, as the subscriber sees it
        if message is not None:
            seen.append(message["data"])
    assert b"lost" not in seen


def test_a_delay_delays_every_command(proxy: TcpProxy) -> None:
    c = client(proxy)
    c.ping()
    proxy.delay(0.2)
    started = time.monotonic()
    c.ping()
    # Both directions wait: at least the delay twice (only a lower bound; nothing can make
    # it faster).
    assert time.monotonic() - started >= 0.4
    proxy.delay(0)
