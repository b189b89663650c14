"""``pymigrate simulate``: run a field scenario on virtual time and print its report.

    pymigrate simulate --list
    pymigrate simulate NAME [--devices N] [--hours H] [--seed S] [--json] [--chart PNG]
                            [--memory] [--no-progress]

Exit status: 0 when every outcome the scenario must show holds, 1 when one does not
(the table lists which), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable, Sequence
from typing import TextIO

from pymigrate.logsetup import setup_logging
from simulators.report import render_table, write_chart
from simulators.scenarios import NAMES, Options, load

__all__ = ["ProgressBar", "main"]


class ProgressBar:
    """A one-line progress bar on stderr (only drawn when stderr is a terminal, or when
    forced), updated with simulated seconds."""

    def __init__(self, total_s: float, *, stream: TextIO | None = None, width: int = 30,
                 force: bool = False) -> None:
        self.total_s = max(total_s, 1e-9)
        self.stream = stream or sys.stderr
        self.width = width
        self.enabled = force or self.stream.isatty()
        self._last = 0.0
        self._t0 = time.perf_counter()

    def __call__(self, now_s: float) -> None:
        if not self.enabled:
            return
        wall = time.perf_counter()
        if wall - self._last < 0.2 and now_s < self.total_s:
            return
        self._last = wall
        frac = min(1.0, now_s / self.total_s)
        done = int(frac * self.width)
        self.stream.write(f"\r[{'#' * done}{'.' * (self.width - done)}] "
                          f"{now_s / 3600:7.2f} h simulated  {wall - self._t0:6.1f} s")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pymigrate simulate",
                                description="Run a field scenario on virtual time.")
    p.add_argument("name", nargs="?", help="scenario name (see --list)")
    p.add_argument("--list", action="store_true", help="list the scenarios")
    p.add_argument("--devices", type=int, help="simulated devices (scenario default)")
    p.add_argument("--hours", type=float, help="simulated hours of data (scenario default)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--chart", metavar="PNG", help="write backlog/delivery/bandwidth chart")
    p.add_argument("--memory", action="store_true",
                   help="measure peak memory with tracemalloc (slower)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def main(argv: Sequence[str] | None = None, *,
         progress_factory: Callable[[float], ProgressBar] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = _parser().parse_args(list(argv) if argv is not None else None)
    out = sys.stdout
    if args.list:
        for name in NAMES:
            mod = load(name)
            out.write(f"{name:20s} {mod.SUMMARY}  (default: {mod.DEFAULTS['devices']} "
                      f"devices, {mod.DEFAULTS['hours']} h)\n")
        return 0
    if not args.name:
        sys.stderr.write("pymigrate simulate: give a scenario name or --list\n")
        return 2
    try:
        mod = load(args.name)
    except KeyError:
        sys.stderr.write(f"pymigrate simulate: unknown scenario {args.name!r} "
                         f"(known: {', '.join(NAMES)})\n")
        return 2
    if (args.devices is not None and args.devices < 1) or (
            args.hours is not None and args.hours <= 0):
        sys.stderr.write("pymigrate simulate: --devices must be >= 1 and --hours > 0\n")
        return 2
    setup_logging("console", "error")  # the report is the output; errors still show
    opts = Options(devices=args.devices, hours=args.hours, seed=args.seed,
                   memory=args.memory or bool(getattr(mod, "MEMORY", False)))
    _, hours = opts.resolved(mod.DEFAULTS)
    bar = None
    if not args.no_progress:
        bar = (progress_factory or ProgressBar)(hours * 3600.0)
        opts.progress = bar
    try:
        report = asyncio.run(mod.run(opts))
    finally:
        if bar is not None:
            bar.close()
    problems = mod.check(report)
    report.extra["checks_failed"] = problems
    if args.chart and not write_chart(report, args.chart):
        sys.stderr.write("chart skipped: matplotlib is not installed "
                         "(pip install 'pymigrate-iot[sim]')\n")
    if args.json:
        out.write(report.to_json().decode() + "\n")
    else:
        out.write(render_table(report) + "\n")
        out.write("checks: " + ("all passed" if not problems else
                                "FAILED: " + "; ".join(problems)) + "\n")
    return 0 if not problems else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
