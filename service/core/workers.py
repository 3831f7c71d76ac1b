"""The registry of live processes: each one's heartbeat says which settings version it applied,
so the propagation view and ``PUT ?wait=true`` can see every process of every replica."""

from __future__ import annotations

import socket
import time
from typing import Any

import msgspec

from service.core.connection import Connection

WORKER_TTL_SECONDS = 5.0


class WorkerRecord(msgspec.Struct, kw_only=True, frozen=True):
    worker_id: str
    host: str
    pid: int
    applied_version: int
    applied_at: float
    last_seen: float


_decoder = msgspec.json.Decoder(WorkerRecord)


class WorkerRegistry:
    def __init__(self, conn: Connection):
        self.conn = conn
        self.key = conn.keys.workers

    async def register(self, worker: WorkerRecord) -> None:
        key = f"{self.key}:{worker.worker_id}"

        async def op() -> None:
            async with self.conn.client.pipeline(transaction=True) as pipe:
                pipe.set(key, msgspec.json.encode(worker), px=int(WORKER_TTL_SECONDS * 1000))
                pipe.zadd(self.key, {worker.worker_id: worker.last_seen})
                await pipe.execute()

        await self.conn.call(op)

    async def deregister(self, worker_id: str) -> None:
        async def op() -> None:
            async with self.conn.client.pipeline(transaction=True) as pipe:
                pipe.delete(f"{self.key}:{worker_id}")
                pipe.zrem(self.key, worker_id)
                await pipe.execute()

        await self.conn.call(op)

    async def live(self) -> list[WorkerRecord]:
        cutoff = time.time() - WORKER_TTL_SECONDS

        async def op() -> list[Any]:
            async with self.conn.client.pipeline(transaction=False) as pipe:
                pipe.zremrangebyscore(self.key, "-inf", cutoff)
                pipe.zrange(self.key, 0, -1)
                _, ids = await pipe.execute()
            if not ids:
                return []
            keys = [f"{self.key}:{i.decode()}" for i in ids]
            return list(await self.conn.client.mget(keys))

        raws = await self.conn.call(op)
        return sorted(
            (_decoder.decode(r) for r in raws if r is not None), key=lambda w: w.worker_id
        )


def hostname() -> str:
    return socket.gethostname()
