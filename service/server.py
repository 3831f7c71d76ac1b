"""Running the app: one uvicorn server per OS process, and a small supervisor for N of them.

The listening socket is bound once here and shared by the worker processes. SIGTERM or SIGINT
makes each worker drain: it marks itself not ready at once (``/health/ready`` answers 503
"draining", the proxy refuses new requests), keeps listening while the requests in flight
finish (an SSE stream to its last event) so probes and late clients get that answer rather than
a refused connection, then stops accepting, runs the app's shutdown (leaving pub/sub and the
worker registry, flushing what is pending) and exits 0. Requests still running when
``CODEX_LB_DRAIN_SECONDS`` are up are cancelled. The supervisor forwards the signal and waits for
all of them. A worker that dies on its own is restarted.

With several workers, their metrics are kept in files in a directory of the supervisor's own
(prometheus_client's multiprocess mode), so ``/metrics`` on any worker reports the replica: the
directory is made fresh for each run, named to the workers through ``PROMETHEUS_MULTIPROC_DIR``
before they start (they decide their mode when they import prometheus_client), told when a
worker has ended, and removed at exit. One worker keeps its metrics in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import multiprocessing
import multiprocessing.process
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any

import uvicorn
from prometheus_client import multiprocess

from service.app import create_app
from service.config import Config
from service.logs import config_dict

log = logging.getLogger(__name__)

# How often the drain looks whether the requests in flight are done.
DRAIN_POLL_SECONDS = 0.05
# uvicorn's own wait for connections once it stops accepting: never zero, or it would cancel
# requests that end in the same instant.
SHUTDOWN_MIN_SECONDS = 0.5
# What the supervisor allows a worker beyond the drain: the app's shutdown (normally well under
# a second: pub/sub, registry, flushes).
EXIT_MARGIN_SECONDS = 5.0


class DrainingServer(uvicorn.Server):
    """Marks the app not-ready as soon as shutdown starts, finishes the requests in flight while
    still listening, and exits 0 on SIGTERM/SIGINT."""

    def __init__(self, config: uvicorn.Config, app: Any, drain_seconds: float):
        super().__init__(config)
        self._app = app
        self.drain_seconds = drain_seconds

    def _start_draining(self) -> None:
        parts = getattr(self._app.state, "parts", None)
        if parts is not None:
            parts.hub.draining = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._start_draining()
        super().handle_exit(sig, frame)
        # uvicorn re-raises captured signals after shutdown, which would end the process with
        # the signal's status; a graceful stop is a clean exit.
        self._captured_signals.clear()

    async def main_loop(self) -> None:
        await super().main_loop()
        await self.drain()

    async def drain(self) -> None:
        """Until no request is in flight or the drain time is up; uvicorn's shutdown, which
        stops accepting and cancels what is still running at its timeout, gets what is left."""
        self._start_draining()
        deadline = time.monotonic() + self.drain_seconds
        tasks = self.server_state.tasks
        if tasks:
            log.info("draining: %d request(s) in flight", len(tasks))
        # Polled: uvicorn has no event for "no request in flight" (its own shutdown polls too).
        while tasks and not self.force_exit and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(DRAIN_POLL_SECONDS)
        left = deadline - time.monotonic()
        if tasks and left <= 0:
            log.warning(
                "drain time (%ss) is up with %d request(s) in flight",
                self.drain_seconds,
                len(tasks),
            )
        # Typed int by uvicorn, but it only goes to asyncio.timeout, which takes a float.
        self.config.timeout_graceful_shutdown = max(left, SHUTDOWN_MIN_SECONDS)  # type: ignore[assignment]


# The youngest generation's threshold (Python's default is 700 allocations).
GC_YOUNG_THRESHOLD = 20_000


def run_worker(sock: socket.socket) -> None:
    config = Config.from_env()
    app = create_app(config)
    # What exists now lives as long as the process: kept out of the collector's scans, and the
    # youngest generation collected less often, so a busy worker does not stall its streams for
    # collections that find nothing (the proxy allocates and frees a lot per request).
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    uv_config = uvicorn.Config(
        app,
        log_config=config_dict(config.log_format),
        # Replaced by what is left of the drain when shutdown begins (DrainingServer.drain).
        timeout_graceful_shutdown=math.ceil(config.drain_seconds),
        server_header=False,
        proxy_headers=False,  # forwarded headers are judged by our own trusted-proxy list
    )
    DrainingServer(uv_config, app, config.drain_seconds).run(sockets=[sock])


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted connections only when the
    # listening socket says it is TCP. Without it every keep-alive reply stalls ~40 ms
    # (Nagle + delayed ACK between uvicorn's separate header and body writes).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(host: str, port: int, workers: int) -> int:
    sock = bind(host, port)
    if workers <= 1:
        run_worker(sock)
        return 0
    with _shared_metrics() as metrics_dir:
        return _supervise(sock, workers, Config.from_env().drain_seconds, metrics_dir)


@contextlib.contextmanager
def _shared_metrics() -> Iterator[str]:
    """A fresh private directory for the workers' metrics, named in the environment they
    inherit; removed afterwards. Never one inherited from our own environment: files another
    run left there would count as ours."""
    path = tempfile.mkdtemp(prefix="codex-lb-metrics-")  # mode 0700
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _supervise(sock: socket.socket, workers: int, drain_seconds: float, metrics_dir: str) -> int:
    ctx = multiprocessing.get_context("spawn")
    stopping = False

    def on_signal(sig: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def spawn() -> multiprocessing.process.BaseProcess:
        proc = ctx.Process(target=run_worker, args=(sock,), daemon=False)
        proc.start()
        return proc

    procs = [spawn() for _ in range(workers)]
    while not stopping:
        time.sleep(0.2)
        for i, proc in enumerate(procs):
            if not proc.is_alive() and not stopping:
                log.warning("worker %s exited with %s; restarting", proc.pid, proc.exitcode)
                # Its gauges leave the replica's numbers; its counts stay in the totals.
                multiprocess.mark_process_dead(proc.pid, metrics_dir)
                procs[i] = spawn()

    for proc in procs:
        if proc.is_alive() and proc.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
    # No worker is spawned any more: once the workers close their copies, new connections are
    # refused at once instead of waiting in a backlog nobody accepts from.
    sock.close()
    deadline = time.monotonic() + drain_seconds + EXIT_MARGIN_SECONDS
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()
    return 0
