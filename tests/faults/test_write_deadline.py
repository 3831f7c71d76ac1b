"""A write script held up on the way to Redis (a frozen link that heals later) must not commit
after its caller was told 503: each write carries a deadline that the script checks by Redis's
clock before it does anything."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from service.core.connection import UNKNOWN_OUTCOME, Connection, connect
from service.core.errors import StoreUnavailable
from tests.faults.tcp_proxy import TcpProxy

SET = "redis.call('SET', KEYS[1], ARGV[1]) return 1"


async def test_a_write_held_past_its_deadline_does_nothing_when_it_arrives(
    redis_url: str, prefix: str, raw_redis: redis.Redis
) -> None:
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    key = f"{prefix}deadline-test"
    with TcpProxy(port) as proxy:
        conn = Connection(connect(proxy.url()), prefix)
        try:
            write = conn.write_script(SET)
            assert await write([key], ["first"]) == 1
            assert raw_redis.get(key) == b"first"
            proxy.pause()
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as refused:
                await write([key], ["held"])
            assert time.monotonic() - started >= 1.9  # the client's timeout, not a refusal
            assert refused.value.message == UNKNOWN_OUTCOME
            proxy.resume()  # the held script reaches Redis now, past its deadline
            await asyncio.sleep(0.5)
            assert raw_redis.get(key) == b"first"
            # The connection is usable again, and a timely write commits.
            assert await write([key], ["second"]) == 1
            assert raw_redis.get(key) == b"second"
        finally:
            await conn.close()


async def test_a_script_started_past_its_deadline_answers_late(
    redis_url: str, prefix: str, raw_redis: redis.Redis
) -> None:
    conn = Connection(connect(redis_url), prefix)
    try:
        write = conn.write_script(SET)
        key, write_key = f"{prefix}late", f"{prefix}write:late"
        past = int((time.time() - 1) * 1000)
        with pytest.raises(redis.exceptions.ResponseError, match=r"^LATE"):
            await write._script(keys=[key, write_key], args=["x", past])
        assert raw_redis.get(key) is None
        assert raw_redis.get(write_key) is None
    finally:
        await conn.close()
