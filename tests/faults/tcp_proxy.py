"""A TCP proxy of ours between ``codex-lb serve`` processes and redis-server, which a test (or a
benchmark) tells to misbehave the ways a network does:

* ``pause``: hold the bytes of the chosen connections (both directions) until ``resume``: a
  partition that heals, or a Redis frozen by a long fork or a slow disk;
* ``drop``: close the chosen connections at once (held bytes are lost); ``refuse=True`` also stops
  listening, so new connections are refused until ``restore``: Redis gone;
* ``delay``: forward every chunk this many seconds late: a slow link.

"The chosen connections" are all of them, or only ``subscribers``: those that sent a SUBSCRIBE
(the processes' pub/sub listeners), so a test can lose published messages and nothing else.

It runs its own asyncio loop on a daemon thread; the control methods are called from the test's
thread and return once the change is in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal, TypeVar

Which = Literal["all", "subscribers"]
T = TypeVar("T")

CHUNK = 65536
CONTROL_TIMEOUT_SECONDS = 10.0


@dataclass(eq=False)
class _Link:
    """One client connection and its connection to the target."""

    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    flowing: asyncio.Event = field(default_factory=asyncio.Event)
    subscriber: bool = False
    cut: bool = False

    def chosen(self, which: Which) -> bool:
        return which == "all" or self.subscriber

    def abort(self) -> None:
        # An abort, not a close: nothing held or buffered is sent, as when a link is cut.
        self.cut = True
        for writer in (self.client, self.server):
            writer.transport.abort()
        # A pump holding a chunk wakes up, sees the cut and ends without sending it.
        self.flowing.set()


class TcpProxy:
    """Listens on a free loopback port and forwards to ``target_port``; see the module doc."""

    def __init__(self, target_port: int, host: str = "127.0.0.1"):
        self.host = host
        self.target_port = target_port
        self.port = _free_port(host)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._paused: Which | None = None
        self._delay = 0.0
        # Bytes forwarded client -> target, for a test to see that traffic flowed.
        self.forwarded = 0

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> TcpProxy:
        self._thread.start()
        self._call(self._listen)
        return self

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._shutdown)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CONTROL_TIMEOUT_SECONDS)
        self._loop.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def url(self, db: int = 0) -> str:
        return f"redis://{self.host}:{self.port}/{db}"

    # --- faults -------------------------------------------------------------------------------

    def pause(self, which: Which = "all") -> None:
        """Hold the bytes of the chosen connections (and of new ones that are chosen)."""

        async def run() -> None:
            self._paused = which
            for link in self._links:
                if link.chosen(which):
                    link.flowing.clear()

        self._call(run)

    def resume(self) -> None:
        """Let every held byte go on, in order."""

        async def run() -> None:
            self._paused = None
            for link in self._links:
                link.flowing.set()

        self._call(run)

    def drop(self, which: Which = "all", *, refuse: bool = False) -> int:
        """Cut the chosen connections (what they held is lost); with ``refuse``, also refuse new
        connections until ``restore``. How many were cut."""

        async def run() -> int:
            if refuse and self._server is not None:
                self._server.close()
                await self._server.wait_closed()
                self._server = None
            cut = [link for link in self._links if link.chosen(which)]
            for link in cut:
                link.abort()
                self._links.discard(link)
            return len(cut)

        return self._call(run)

    def restore(self) -> None:
        """Accept connections again after ``drop(refuse=True)``, and end any pause or delay."""

        async def run() -> None:
            if self._server is None:
                await self._listen()
            self._delay = 0.0

        self._call(run)
        self.resume()

    def delay(self, seconds: float) -> None:
        """Forward every chunk ``seconds`` late (0: at once)."""

        async def run() -> None:
            self._delay = seconds

        self._call(run)

    def connections(self, which: Which = "all") -> int:
        async def run() -> int:
            return sum(1 for link in self._links if link.chosen(which))

        return self._call(run)

    # --- the loop's side ----------------------------------------------------------------------

    def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        async def wrapped() -> T:
            return await fn()

        future = asyncio.run_coroutine_threadsafe(wrapped(), self._loop)
        return future.result(CONTROL_TIMEOUT_SECONDS)

    async def _listen(self) -> None:
        # SO_REUSEADDR (asyncio's default on POSIX) lets the port be taken again after a refusal.
        self._server = await asyncio.start_server(self._accept, self.host, self.port)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for link in list(self._links):
            link.abort()
        self._links.clear()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            # The target is down: the client sees its connection closed at once, as it would.
            writer.transport.abort()
            return
        link = _Link(client=writer, server=up_writer)
        if self._paused != "all":
            link.flowing.set()
        self._links.add(link)
        try:
            await asyncio.gather(
                self._pump(link, reader, up_writer, upstream=True),
                self._pump(link, up_reader, writer, upstream=False),
            )
        finally:
            self._links.discard(link)
            link.abort()

    async def _pump(
        self,
        link: _Link,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        upstream: bool,
    ) -> None:
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                if upstream and not link.subscriber and b"SUBSCRIBE" in data.upper():
                    link.subscriber = True
                    if self._paused == "subscribers":
                        link.flowing.clear()
                await link.flowing.wait()
                if self._delay > 0:
                    await asyncio.sleep(self._delay)
                if link.cut:
                    break
                writer.write(data)
                await writer.drain()
                if upstream:
                    self.forwarded += len(data)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            # A half-close passes on (the peer's EOF), then the link ends whole.
            with contextlib.suppress(OSError, RuntimeError):
                if writer.can_write_eof():
                    writer.write_eof()
            link.abort()


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def proxying(target_port: int) -> Iterator[TcpProxy]:
    """A started ``TcpProxy`` to ``target_port`` while inside."""
    proxy = TcpProxy(target_port).start()
    try:
        yield proxy
    finally:
        proxy.close()
