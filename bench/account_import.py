"""A bulk import: 1,000 auth.json files in one POST /api/accounts/import, one serve process.

One serve process (``--workers 1``: the serve process is the worker that handles requests)
on a private Redis; its upstream and auth URLs point at a closed loopback port, so the usage
poller can never reach the internet. The files are distinct identities (account id, email,
tokens), sent as multipart parts named ``auth_json`` (auth-0001.json, ...) in one request.

Figures per import: the request's wall time, its status and result counts, and the serve
process's memory: VmRSS read from /proc every 10 ms in a thread during the request (the peak
minus the RSS just before), and VmHWM after the request, its peak reset just before through
``/proc/<pid>/clear_refs`` (so it catches a peak between two samples). The same files are then
imported a second time (every account ``updated``).
"""

from __future__ import annotations

import argparse
import json
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.common import (
    BenchError,
    Check,
    children,
    cluster,
    expect,
    heading,
    login,
    session_client,
    table,
    unreachable_url,
)
from tests.factories import auth_json

NAME = "import"
SUMMARY = "POST /api/accounts/import of 1,000 auth.json files: wall time, server memory growth"
TARGET_SECONDS = 10.0
TARGET_GROWTH_MB = 200.0
SAMPLE_SECONDS = 0.010
REQUEST_TIMEOUT_SECONDS = 300.0
PART_NAME = "auth_json"
MB = 1024 * 1024  # the figures are MiB; the target is decimal MB, checked as such
TARGET_GROWTH = f"< {TARGET_GROWTH_MB:g} MB ({TARGET_GROWTH_MB * 1e6 / MB:.1f} MiB)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(NAME)
    group.add_argument(
        "--files", type=int, default=1000, help="auth.json files in the request (default 1000)"
    )
    group.add_argument(
        "--token-padding",
        type=int,
        default=0,
        metavar="CHARS",
        help="characters added to the signature of each id and access token (default 0: the "
        "test factory's ~0.6 KB files; about 1500 gives files of a real auth.json's few KB)",
    )


# --- the server's memory ------------------------------------------------------------------------


def _status_kb(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (kB) of a process, from /proc/<pid>/status."""
    values: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError as exc:
        raise BenchError(f"cannot read /proc/{pid}/status: {exc}") from None
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0])
    if len(values) != 2:
        raise BenchError(f"/proc/{pid}/status has no VmRSS/VmHWM")
    return values


def _reset_peak(pid: int) -> bool:
    """Reset the process's VmHWM to its current RSS (Linux 4.0+); False if not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class RssSampler(threading.Thread):
    """Reads a process's VmRSS every ``interval`` seconds until stopped; keeps the peak."""

    def __init__(self, pid: int, interval: float):
        super().__init__(name="rss-sampler", daemon=True)
        self.pid = pid
        self.interval = interval
        self.peak_kb = 0
        self.samples = 0
        self.error: BaseException | None = None
        self._stop_event = threading.Event()

    def _sample(self) -> None:
        self.peak_kb = max(self.peak_kb, _status_kb(self.pid)["VmRSS"])
        self.samples += 1

    def run(self) -> None:
        try:
            self._sample()
            while not self._stop_event.wait(self.interval):
                self._sample()
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        if self.error is not None:
            raise BenchError(f"RSS sampling failed: {self.error}")


# --- one import ---------------------------------------------------------------------------------


@dataclass
class ImportRun:
    label: str
    status: int
    seconds: float
    results: Counter[str] = field(default_factory=Counter)
    rss_before_kb: int = 0
    rss_after_kb: int = 0
    sampled_peak_kb: int = 0
    samples: int = 0
    hwm_after_kb: int = 0
    hwm_reset: bool = False
    error: str = ""

    @property
    def sampled_growth_mb(self) -> float:
        return (self.sampled_peak_kb - self.rss_before_kb) / 1024

    @property
    def hwm_growth_mb(self) -> float | None:
        """Peak during the request from VmHWM, when VmHWM was reset just before it."""
        return (self.hwm_after_kb - self.rss_before_kb) / 1024 if self.hwm_reset else None

    @property
    def growth_mb(self) -> float:
        hwm = self.hwm_growth_mb
        return self.sampled_growth_mb if hwm is None else max(hwm, self.sampled_growth_mb)

    @property
    def retained_mb(self) -> float:
        return (self.rss_after_kb - self.rss_before_kb) / 1024


def _documents(count: int, padding: int) -> list[tuple[str, tuple[str, bytes, str]]]:
    """``count`` distinct auth.json files as httpx multipart parts."""
    parts = []
    for i in range(1, count + 1):
        doc = auth_json(
            account_id=f"acct-bench-{i:04d}",
            email=f"bench-user-{i:04d}@example.com",
            refresh_token=f"rt-bench-{i:04d}",
            tag=f"bench-{i:04d}",
        )
        if padding > 0:
            # The signature segment is opaque to codex-lb (it reads only the payload).
            for name in ("id_token", "access_token"):
                doc["tokens"][name] += secrets.token_urlsafe(padding)[:padding]
        parts.append(
            (PART_NAME, (f"auth-{i:04d}.json", json.dumps(doc).encode(), "application/json"))
        )
    return parts


def _import(
    client: httpx.Client, pid: int, parts: list[tuple[str, tuple[str, bytes, str]]], label: str
) -> ImportRun:
    before = _status_kb(pid)
    hwm_reset = _reset_peak(pid)
    if hwm_reset:
        before = _status_kb(pid)
    sampler = RssSampler(pid, SAMPLE_SECONDS)
    sampler.start()
    started = time.perf_counter()
    try:
        response = client.post("/api/accounts/import", files=parts)
    finally:
        seconds = time.perf_counter() - started
        sampler.stop()
    after = _status_kb(pid)
    run = ImportRun(
        label=label,
        status=response.status_code,
        seconds=seconds,
        rss_before_kb=before["VmRSS"],
        rss_after_kb=after["VmRSS"],
        sampled_peak_kb=max(sampler.peak_kb, after["VmRSS"]),
        samples=sampler.samples,
        hwm_after_kb=after["VmHWM"],
        hwm_reset=hwm_reset,
    )
    if response.status_code == 200:
        results = response.json()["results"]
        run.results.update(r["status"] for r in results)
        filenames = [r["filename"] for r in results]
        if filenames != [name for _, (name, _, _) in parts]:
            raise BenchError(f"{label}: the results do not name the files in order")
    else:
        run.error = response.text[:300]
    return run


# --- the benchmark ------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> list[Check]:
    files: int = args.files
    if files < 1 or args.token_padding < 0:
        raise BenchError("--files must be at least 1, --token-padding at least 0")
    heading(f"{NAME}: {files} auth.json files in one POST /api/accounts/import, 1 serve process")
    parts = _documents(files, args.token_padding)
    body_mb = sum(len(content) for _, (_, content, _) in parts) / MB
    nowhere = unreachable_url()
    env = {"CODEX_LB_UPSTREAM_BASE_URL": nowhere, "CODEX_LB_AUTH_BASE_URL": nowhere}
    with cluster(1, workers=1, extra_env=env) as c:
        serve = c.serves[0]
        pid = serve.proc.pid
        spawned = children(pid)
        if spawned:
            raise BenchError(f"serve {pid} has child processes {spawned}: not one process")
        token = login(serve.url)
        with session_client(serve.url, token, timeout=REQUEST_TIMEOUT_SECONDS) as client:
            first = _import(client, pid, parts, "import (new)")
            second = _import(client, pid, parts, "re-import (same files)")
            listed = len(expect(client.get("/api/accounts")).json()["accounts"])
    return _report(files, body_mb, pid, first, second, listed)


def _report(
    files: int, body_mb: float, pid: int, first: ImportRun, second: ImportRun, listed: int
) -> list[Check]:
    print(
        f"serve pid {pid} (--workers 1, no child processes: it handles the requests itself); "
        f"request: {files} files, {body_mb:.2f} MiB of JSON ({body_mb * MB / files / 1024:.2f} "
        "KiB a file)"
    )

    def results(r: ImportRun) -> str:
        return ", ".join(f"{n} {s}" for s, n in sorted(r.results.items())) or r.error or "-"

    def hwm(r: ImportRun) -> str:
        growth = r.hwm_growth_mb
        return "n/a" if growth is None else f"{growth:+.1f}"

    rows = [
        [
            r.label,
            f"{r.seconds:.3f}",
            str(r.status),
            results(r),
            f"{r.rss_before_kb / 1024:.1f}",
            f"{r.sampled_growth_mb:+.1f}",
            hwm(r),
            f"{r.retained_mb:+.1f}",
            str(r.samples),
        ]
        for r in (first, second)
    ]
    headers = [
        "",
        "wall s",
        "HTTP",
        "results",
        "RSS before MiB",
        "sampled peak",
        "VmHWM peak",
        "retained",
        "samples",
    ]
    print(table(headers, rows))
    print(
        "(memory columns are MiB over the RSS just before the request: the highest VmRSS "
        f"sample every {SAMPLE_SECONDS * 1000:.0f} ms, VmHWM after a reset just before, and "
        "VmRSS after the response)"
    )
    if not first.hwm_reset:
        print("VmHWM could not be reset (/proc/<pid>/clear_refs): only the samples count")
    print(f"GET /api/accounts afterwards lists {listed} accounts (expected {files})")

    created_ok = first.status == 200 and first.results == Counter({"created": files})
    updated_ok = second.status == 200 and second.results == Counter({"updated": files})
    checks = [
        Check(
            NAME,
            f"import of {files} files: wall time",
            f"< {TARGET_SECONDS:g} s, all created",
            f"{first.seconds:.3f} s, {first.results['created']} created",
            created_ok and first.seconds < TARGET_SECONDS,
        ),
        Check(
            NAME,
            "import: serve process memory growth (peak - before)",
            TARGET_GROWTH,
            f"{first.growth_mb:.1f} MiB",
            first.status == 200 and first.growth_mb * MB < TARGET_GROWTH_MB * 1_000_000,
        ),
        Check(
            NAME,
            f"re-import of {files} files: wall time",
            f"< {TARGET_SECONDS:g} s, all updated",
            f"{second.seconds:.3f} s, {second.results['updated']} updated",
            updated_ok and second.seconds < TARGET_SECONDS,
        ),
        Check(
            NAME,
            "re-import: serve process memory growth (peak - before)",
            TARGET_GROWTH,
            f"{second.growth_mb:.1f} MiB",
            second.status == 200 and second.growth_mb * MB < TARGET_GROWTH_MB * 1_000_000,
        ),
    ]
    if listed != files:
        checks.append(Check(NAME, "accounts listed afterwards", str(files), str(listed), False))
    for check in checks:
        print(f"{check.verdict}: {check.name} = {check.value} (target {check.target})")
    return checks
