"""Benchmarks of codex-lb (settings plane, accounts, API keys, proxy), each with its own Redis.

Run them with ``scripts/bench`` (no arguments lists them).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from bench import (
    account_import,
    hotpath,
    keycheck,
    latency,
    ops_faults,
    ops_load,
    pool,
    propagation,
    proxy,
)
from bench.common import Check


@dataclass(frozen=True)
class Benchmark:
    name: str
    summary: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], list[Check]]


BENCHMARKS: tuple[Benchmark, ...] = tuple(
    Benchmark(m.NAME, m.SUMMARY, m.add_arguments, m.run)
    for m in (
        propagation,
        latency,
        hotpath,
        account_import,
        keycheck,
        proxy,
        pool,
        ops_load,
        ops_faults,
    )
)

# Groups of benchmarks run together under one name.
SUITES: dict[str, tuple[str, ...]] = {
    "settings": ("propagation", "latency", "hotpath"),
    "accounts": ("import", "keycheck"),
    "ops": ("ops-load", "ops-faults"),
}
