"""The figures of ``bench/proxy.py`` and their report: one table (a row per figure, the
targets' rows with PASS/FAIL) and one JSON line with every figure."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from bench import proxy_pick
from bench.common import Check, percentile, table
from bench.proxy_load import Load

TARGET_ADDED_P50_C1_MS = 2.0
TARGET_ADDED_P99_C32_MS = 20.0
TARGET_RATIO_C32 = 0.60
TARGET_PICK_US = 100.0
TARGET_ON_PATH = 2.0
TARGET_GROWTH_PERCENT = 10.0
# redis-py's incr() sends INCRBY.
ON_PATH = ("getex", "incrby", "incr")
CPU_NAMES = ("worker", "fake", "redis", "client")
# Also watched: the thin passthrough yardstick (its own process)
WATCHED = (*CPU_NAMES, "thin")


@dataclass
class RedisCase:
    label: str
    requests: int
    busy: dict[str, int]
    idle: dict[str, int]
    seconds: float

    def per_request(self) -> dict[str, float]:
        names = sorted(n for n in set(self.busy) | set(self.idle) if self.busy.get(n, 0))
        return {n: (self.busy.get(n, 0) - self.idle.get(n, 0)) / self.requests for n in names}

    @property
    def on_path(self) -> float:
        return sum(self.per_request().get(n, 0.0) for n in ON_PATH)

    @property
    def total(self) -> float:
        return (sum(self.busy.values()) - sum(self.idle.values())) / self.requests


@dataclass
class Figures:
    levels: dict[int, dict[str, Load]] = field(default_factory=dict)
    redis: list[RedisCase] = field(default_factory=list)
    pid: int = 0
    rss_before_kb: int = 0
    rss_after_kb: int = 0
    counted: int = 0  # proxied requests between the two RSS readings
    proxy_errors: Counter[str] = field(default_factory=Counter)
    direct_errors: Counter[str] = field(default_factory=Counter)
    proxied: int = 0  # every proxied request sent, warm-ups included
    log_lines: list[str] = field(default_factory=list)
    fake_stats: dict[str, Any] = field(default_factory=dict)


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"


def _strict(value: Any) -> Any:
    """The value with NaN and infinities as null, so the JSON line is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    return value


class Report:
    """The table's rows, the checks and the JSON document, built section by section."""

    HEADERS = ("figure", "measured", "direct", "vs direct", "target", "result")

    def __init__(self, name: str):
        self.name = name
        self.rows: list[list[str]] = []
        self.checks: list[Check] = []
        self.data: dict[str, Any] = {"benchmark": name}

    def check(self, label: str, target: str, value: str, passed: bool) -> Check:
        return Check(self.name, label, target, value, passed)

    def row(
        self, figure: str, measured: str, direct: str, versus: str, check: Check | None = None
    ) -> None:
        if check is not None:
            self.checks.append(check)
        target, verdict = (check.target, check.verdict) if check else ("", "")
        self.rows.append([figure, measured, direct, versus, target, verdict])

    # --- sections ---------------------------------------------------------------------------

    def ttfe(self, levels: dict[int, dict[str, Load]]) -> None:
        self.data["ttfe_ms"] = {}
        for level, got in levels.items():
            entry: dict[str, Any] = {label: _load(load) for label, load in got.items()}
            proxy, direct = entry["proxy"], entry["direct"]
            for p in (50, 99):
                added = entry[f"added_p{p}"] = proxy[f"p{p}"] - direct[f"p{p}"]
                check = None
                if (level, p) == (1, 50):
                    limit = TARGET_ADDED_P50_C1_MS
                    check = self.check(
                        "TTFE added p50 at c1",
                        f"<= {limit:g} ms",
                        f"{added:.3f} ms",
                        added <= limit,
                    )
                elif (level, p) == (32, 99):
                    limit = TARGET_ADDED_P99_C32_MS
                    check = self.check(
                        "TTFE added p99 at c32",
                        f"<= {limit:g} ms",
                        f"{added:.3f} ms",
                        added <= limit,
                    )
                self.row(
                    f"TTFE p{p} c{level} ms (n {proxy['n']}/{direct['n']})",
                    _ms(proxy[f"p{p}"]),
                    _ms(direct[f"p{p}"]),
                    f"{added:+.3f}",
                    check,
                )
                if "thin" in entry:
                    thin = entry["thin"]
                    entry[f"thin_added_p{p}"] = thin[f"p{p}"] - direct[f"p{p}"]
                    self.row(
                        f"  thin passthrough, TTFE p{p} c{level} ms",
                        _ms(thin[f"p{p}"]),
                        _ms(direct[f"p{p}"]),
                        f"{entry[f'thin_added_p{p}']:+.3f}",
                    )
            self.data["ttfe_ms"][f"c{level}"] = entry
            if level in (min(levels), max(levels)):
                if "thin" in entry:
                    thin_cpu = entry["thin"]["cpu_ms_per_request"].get("thin", math.nan)
                    self.row(
                        f"  thin passthrough CPU ms/req c{level}",
                        f"{thin_cpu:.3f}",
                        "",
                        "the yardstick's own process",
                    )
                cpu = {t: entry[t]["cpu_ms_per_request"] for t in ("proxy", "direct")}
                self.row(
                    f"CPU ms/req c{level}: {' / '.join(CPU_NAMES)}",
                    " / ".join(f"{cpu['proxy'][n]:.3f}" for n in CPU_NAMES),
                    " / ".join(
                        "-" if n == "worker" else f"{cpu['direct'][n]:.3f}" for n in CPU_NAMES
                    ),
                    f"worker busy {proxy['cpu_busy']['worker'] * 100:.0f} %",
                )

    def throughput(self, levels: dict[int, dict[str, Load]]) -> None:
        top = max(levels)
        proxy, direct = levels[top]["proxy"].rate, levels[top]["direct"].rate
        ratio = proxy / direct
        self.data["throughput"] = {
            "concurrency": top,
            "proxy_req_per_s": proxy,
            "direct_req_per_s": direct,
            "ratio": ratio,
        }
        if "thin" in levels[top]:
            thin = levels[top]["thin"].rate
            self.data["throughput"].update(
                thin_req_per_s=thin, thin_ratio=thin / direct, proxy_vs_thin=proxy / thin
            )
            self.row(
                f"  thin passthrough req/s c{top}",
                f"{thin:.0f}",
                f"{direct:.0f}",
                f"x{thin / direct:.3f} (codex-lb = x{proxy / thin:.2f} of it)",
            )
        self.row(
            f"req/s c{top}, 5 deltas",
            f"{proxy:.0f}",
            f"{direct:.0f}",
            f"x{ratio:.3f}",
            self.check(
                f"throughput c{top} proxy/direct",
                f">= {TARGET_RATIO_C32:.2f}",
                f"{ratio:.3f}",
                ratio >= TARGET_RATIO_C32,
            ),
        )

    def balancer(self, picks: proxy_pick.PickFigures) -> None:
        sizes = proxy_pick.SIZES
        across = " / ".join(str(n) for n in sizes)
        for strategy, prefer in proxy_pick.POLICIES:
            label = proxy_pick.policy_label(strategy, prefer)
            worst = picks.pick_us[sizes[-1]][label]
            self.row(
                f"pick us, {label} (n {across})",
                " / ".join(f"{picks.pick_us[n][label]:.2f}" for n in sizes),
                "",
                "",
                self.check(
                    f"pick {label} at {sizes[-1]} accounts",
                    f"<= {TARGET_PICK_US:g} us at {sizes[-1]}",
                    f"{worst:.2f} us",
                    worst <= TARGET_PICK_US,
                ),
            )
        failover = " / ".join(f"{picks.failover_us[n]:.1f}" for n in sizes)
        self.row(f"pick us after a failover, usage_weighted (n {across})", failover, "", "")
        build = " / ".join(f"{picks.build_us[n]:.1f}" for n in sizes)
        self.row(f"Pool.build us (n {across})", build, "", "")
        self.data["balancer"] = {
            "pick_us": {str(n): v for n, v in picks.pick_us.items()},
            "pick_after_failover_us": {str(n): v for n, v in picks.failover_us.items()},
            "build_us": {str(n): v for n, v in picks.build_us.items()},
            "eligible": {str(n): v for n, v in picks.eligible.items()},
        }

    def redis(self, cases: list[RedisCase]) -> None:
        self.data["redis"] = {}
        for case in cases:
            per = case.per_request()
            incr = per.get("incrby", 0.0) + per.get("incr", 0.0)
            self.row(
                f"Redis on-path cmds/req, {case.label}",
                f"{case.on_path:.3f}",
                "",
                f"getex {per.get('getex', 0.0):.3f} + incr {incr:.3f}",
                self.check(
                    f"Redis on-path commands per request, {case.label}",
                    f"<= {TARGET_ON_PATH:g}",
                    f"{case.on_path:.3f}",
                    case.on_path <= TARGET_ON_PATH,
                ),
            )
            off = sorted(((v, n) for n, v in per.items() if n not in ON_PATH), reverse=True)
            top = ", ".join(f"{n} {v:.2f}" for v, n in off[:3])
            self.row(f"Redis all cmds/req, {case.label}", f"{case.total:.3f}", "", top)
            self.data["redis"][case.label] = {
                "requests": case.requests,
                "window_s": case.seconds,
                "on_path_per_request": case.on_path,
                "total_per_request": case.total,
                "per_request": per,
                "busy": {n: v for n, v in sorted(case.busy.items()) if v},
                "idle": {n: v for n, v in sorted(case.idle.items()) if v},
            }

    def memory(self, f: Figures) -> None:
        growth = (f.rss_after_kb - f.rss_before_kb) / f.rss_before_kb * 100
        self.row(
            f"worker RSS MiB over {f.counted} proxied requests",
            f"{f.rss_before_kb / 1024:.1f} -> {f.rss_after_kb / 1024:.1f}",
            "",
            f"{growth:+.2f} %",
            self.check(
                "worker RSS growth",
                f"< {TARGET_GROWTH_PERCENT:g} %",
                f"{growth:+.2f} %",
                growth < TARGET_GROWTH_PERCENT,
            ),
        )
        self.data["memory"] = {
            "pid": f.pid,
            "rss_before_kb": f.rss_before_kb,
            "rss_after_kb": f.rss_after_kb,
            "growth_percent": growth,
            "requests": f.counted,
        }

    def failures(self, f: Figures) -> None:
        failed = sum(f.proxy_errors.values())
        self.row(
            "failed proxied requests",
            f"{failed} of {f.proxied}",
            str(sum(f.direct_errors.values())),
            "",
            self.check("failed proxied requests", "0", str(failed), failed == 0),
        )
        accounts = f.fake_stats.get("accounts", {}).values()
        self.data.update(
            errors={"proxy": dict(f.proxy_errors), "direct": dict(f.direct_errors)},
            proxied_requests=f.proxied,
            serve_log_warnings=len(f.log_lines),
            fake_upstream={
                "total": f.fake_stats.get("total"),
                "aborted": sum(a.get("aborted", 0) for a in accounts),
            },
        )


def _load(load: Load) -> dict[str, Any]:
    return {
        "n": load.ok,
        **{f"p{p}": percentile(load.ttfe_ms, p) for p in (50, 90, 99)},
        "max": max(load.ttfe_ms, default=math.nan),
        "req_per_s": load.rate,
        "errors": sum(load.errors.values()),
        "cpu_ms_per_request": {n: load.cpu_ms_per_request(n) for n in WATCHED},
        "cpu_busy": {n: load.cpu.get(n, 0.0) / load.seconds for n in WATCHED},
    }


def report(name: str, f: Figures, picks: proxy_pick.PickFigures) -> list[Check]:
    """Print the table and the JSON line; the checks."""
    out = Report(name)
    out.ttfe(f.levels)
    out.throughput(f.levels)
    out.balancer(picks)
    out.redis(f.redis)
    out.memory(f)
    out.failures(f)
    out.data["checks"] = {c.name: c.passed for c in out.checks}
    print(table(Report.HEADERS, out.rows))
    print(
        "(measured: through the proxy, or the figure itself; direct: straight to the fake "
        "upstream in the same run; pick/build: median of timeit runs, harness included)"
    )
    for line in f.log_lines[:5]:
        print(f"serve log: {line}")
    print(json.dumps(_strict(out.data)))
    return out.checks
