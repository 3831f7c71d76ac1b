"""Running the app: one uvicorn server per OS process, and a small supervisor for N of them.

The listening socket is bound once here and shared by the worker processes. SIGTERM or SIGINT
makes each worker stop accepting, mark itself not ready (draining), finish in-flight requests
and exit 0; the supervisor waits for all of them. A worker that dies on its own is restarted.

With several workers, their metrics are kept in files in a directory of the supervisor's own
(prometheus_client's multiprocess mode), so ``/metrics`` on any worker reports the replica: the
directory is made fresh for each run, named to the workers through ``PROMETHEUS_MULTIPROC_DIR``
before they start (they decide their mode when they import prometheus_client), told when a
worker has ended, and removed at exit. One worker keeps its metrics in memory.
"""

from __future__ import annotations

import contextlib
import gc
import logging
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

GRACE_SECONDS = 60


class DrainingServer(uvicorn.Server):
    """Marks the app not-ready as soon as shutdown starts, and exits 0 on SIGTERM/SIGINT."""

    def __init__(self, config: uvicorn.Config, app: Any):
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        parts = getattr(self._app.state, "parts", None)
        if parts is not None:
            parts.hub.draining = True
        super().handle_exit(sig, frame)
        # uvicorn re-raises captured signals after shutdown, which would end the process with
        # the signal's status; a graceful stop is a clean exit.
        self._captured_signals.clear()


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
        timeout_graceful_shutdown=GRACE_SECONDS,
        server_header=False,
        proxy_headers=False,  # forwarded headers are judged by our own trusted-proxy list
    )
    DrainingServer(uv_config, app).run(sockets=[sock])


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
        return _supervise(sock, workers, metrics_dir)


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


def _supervise(sock: socket.socket, workers: int, metrics_dir: str) -> int:
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
    deadline = time.monotonic() + GRACE_SECONDS + 5
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()
    return 0
