"""``python -m bench [NAME] [options]``: run one benchmark or a suite; no NAME lists them.

Exit status: 0 when every benchmark ran (a missed target prints FAIL but is not an error),
1 when one could not run, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
import traceback
from types import FrameType

from bench import BENCHMARKS, SUITES, Benchmark
from bench.common import BenchError, Check, heading, table


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/bench", description="codex-lb benchmarks; with no NAME, list them"
    )
    names = parser.add_subparsers(dest="name", metavar="NAME")
    by_name = {b.name: b for b in BENCHMARKS}
    for suite, members in SUITES.items():
        sub = names.add_parser(suite, help=f"run {', '.join(members)}")
        for member in members:
            by_name[member].add_arguments(sub)
    for bench in BENCHMARKS:
        bench.add_arguments(names.add_parser(bench.name, help=bench.summary))
    return parser


def _listing() -> str:
    rows = [[name, "suite: " + ", ".join(members)] for name, members in SUITES.items()]
    rows += [[b.name, b.summary] for b in BENCHMARKS]
    width = max(len(r[0]) for r in rows)
    lines = [f"  {name.ljust(width)}  {text}" for name, text in rows]
    return "\n".join(
        [
            "usage: scripts/bench NAME [options]   (scripts/bench NAME --help for the options)",
            "",
            "benchmarks:",
            *lines,
        ]
    )


def _run(selected: list[Benchmark], args: argparse.Namespace) -> int:
    checks: list[Check] = []
    errors: list[str] = []
    for bench in selected:
        started = time.monotonic()
        try:
            checks += bench.run(args)
        except BenchError as exc:
            errors.append(bench.name)
            print(f"ERROR in {bench.name}: {exc}", file=sys.stderr, flush=True)
        except Exception:
            errors.append(bench.name)
            print(f"ERROR in {bench.name}:", file=sys.stderr, flush=True)
            traceback.print_exc()
        print(f"({bench.name} took {time.monotonic() - started:.1f} s)", flush=True)
    if len(selected) > 1:
        heading("summary")
        rows = [[c.benchmark, c.name, c.target, c.value, c.verdict] for c in checks]
        rows += [[name, "(did not run to the end)", "", "", "ERROR"] for name in errors]
        print(table(["benchmark", "target", "wanted", "measured", "result"], rows))
    return 1 if errors else 0


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # A SIGTERM stops the benchmark like Ctrl-C: the redis-server and serve processes it
    # started are stopped on the way out.
    signal.signal(signal.SIGTERM, _interrupt)
    if args.name is None:
        print(_listing())
        return 0
    by_name = {b.name: b for b in BENCHMARKS}
    members = SUITES.get(args.name, (args.name,))
    try:
        return _run([by_name[m] for m in members], args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
