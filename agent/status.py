"""``pymigrate status``: read a running agent's ``/health`` and ``/metrics`` and summarise.

Exit status: 0 healthy (``ok``, or ``degraded``: alive and buffering while every uplink's
breaker is open, which a restart would not fix), 1 unhealthy (a stage is not alive, or
the agent is stopping), 2 unreachable or not a PyMigrate agent.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from typing import Any, TextIO

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["fetch", "main", "parse_metrics", "summarise"]

DEFAULT_URL = "http://127.0.0.1:9108"
P = "pymigrate_agent_"


def _get(url: str, timeout: float) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:  # 503 still carries the health document
        return int(exc.code), exc.read()


def fetch(base: str, timeout: float = 3.0) -> tuple[dict[str, Any], dict[str, Any]]:
    """(health document, metrics by sample name+labels) from an agent at ``base``."""
    base = base.rstrip("/")
    _, body = _get(f"{base}/health", timeout)
    health = json.loads(body)
    if not isinstance(health, dict) or "stages" not in health:
        raise ValueError("not a PyMigrate agent health document")
    _, text = _get(f"{base}/metrics", timeout)
    return health, parse_metrics(text.decode())


def parse_metrics(text: str) -> dict[str, Any]:
    """``{sample_name: value}`` for unlabelled samples and
    ``{sample_name: {label_value(s): value}}`` for labelled ones."""
    out: dict[str, Any] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.labels:
                key = ",".join(f"{v}" for _, v in sorted(s.labels.items()))
                out.setdefault(s.name, {})[key] = s.value
            else:
                out[s.name] = s.value
    return out


def _n(x: Any) -> str:
    v = float(x or 0)
    return f"{int(v)}" if v.is_integer() else f"{v:.3g}"


def _bytes(x: Any) -> str:
    v = float(x or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if v < 1024 or unit == "GiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return f"{v:.1f} GiB"  # pragma: no cover - loop always returns


def _labelled(m: dict[str, Any], name: str) -> str:
    d = m.get(name) or {}
    if not isinstance(d, dict) or not d:
        return "0"
    total = sum(d.values())
    return f"{_n(total)} (" + ", ".join(f"{k}: {_n(v)}" for k, v in sorted(d.items())) + ")"


def summarise(health: dict[str, Any], m: dict[str, Any]) -> str:
    """A readable multi-line summary of one agent."""
    stages = "  ".join(f"{k} {'up' if v else 'DOWN'}" for k, v in health["stages"].items())
    bl = health.get("backlog", {})
    clock = health.get("clock", {})
    breakers = "  ".join(f"{k}: {v}" for k, v in sorted(health.get("breakers", {}).items()))
    rss = m.get(P + "process_resident_memory_bytes")
    off = clock.get("offset_ms")
    runtime = health.get("runtime", {}) or {}
    lines = [
        f"device    {health.get('device')}   status {health.get('status', '?').upper()}"
        f"   pymigrate {health.get('version', '?')}"
        + (f"   under {runtime['framework']}" if runtime.get("framework") not in (None, "none")
           else ""),
        f"stages    {stages}",
        f"readings  accepted {_n(m.get(P + 'readings_accepted_total'))}"
        f"  rejected {_labelled(m, P + 'readings_rejected_total')}"
        f"  duplicates {_n(m.get(P + 'readings_duplicates_dropped_total'))}"
        f"  delivered {_n(m.get(P + 'readings_acked_total'))}",
        f"evicted   {_labelled(m, P + 'chunks_evicted_total')} chunks,"
        f" {_n(m.get(P + 'readings_evicted_total'))} readings",
        f"backlog   {_n(bl.get('chunks'))} chunks, {_n(bl.get('readings'))} readings,"
        f" {_bytes(bl.get('bytes'))}; oldest data {float(health.get('oldest_data_age_s') or 0):.1f}"
        f" s; buffer file {_bytes(m.get(P + 'buffer_bytes'))}"
        f" of {_bytes(m.get(P + 'buffer_budget_bytes'))}",
        f"uplinks   {breakers or '-'}",
        f"batches   sent {_n(m.get(P + 'batches_sent_total'))}"
        f"  acked {_n(m.get(P + 'batches_acked_total'))}"
        f"  failed {_n(m.get(P + 'batches_failed_total'))}"
        f"  throttled {_n(m.get(P + 'batches_throttled_total'))}"
        f"  rtt {float(m.get(P + 'rtt_seconds') or 0) * 1000:.1f} ms"
        f"  throughput {_bytes(m.get(P + 'throughput_bytes_per_second'))}/s",
        f"clock     {clock.get('state', '?')}"
        + (f", offset {float(off):+.1f} ms" if isinstance(off, int | float) else ""),
        ("aggreg.   " + (f"ratio {float(m.get(P + 'aggregation_ratio') or 0):.3f} (out/in)"
                           if m.get(P + "aggregation_readings_in_total") else "off")
         + (f"   memory RSS {_bytes(rss)}" if rss else "")),
    ]
    blocked = health.get("blocked") or {}
    if blocked:  # the cloud refuses this device for a reason a resend cannot fix
        lines.insert(2, "BLOCKED   " + "  ".join(f"{k}: {v}" for k, v in sorted(blocked.items()))
                     + "   (data kept on the device; see the agent log for the fix)")
    return "\n".join(lines)


def main(argv: list[str] | None = None, *, out: TextIO | None = None) -> int:
    """Entry point of ``pymigrate status``."""
    out = out or sys.stdout
    p = argparse.ArgumentParser(
        prog="pymigrate status",
        description="Print a running agent's health and counters, read from its metrics "
        "endpoint ([metrics] enabled = true in the agent config). Exit status: 0 healthy "
        "(ok or degraded), 1 unhealthy (a stage down, or stopping), 2 unreachable.",
        epilog="Example: pymigrate status --url http://127.0.0.1:9108")
    p.add_argument("--url", default=DEFAULT_URL, help=f"agent metrics base URL ({DEFAULT_URL})")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds per request (3)")
    p.add_argument("--json", action="store_true", help="print the health document as JSON")
    p.add_argument("--quiet", "-q", action="store_true",
                   help="print nothing; exit status only (container health checks)")
    args = p.parse_args(argv)
    try:
        health, metrics = fetch(args.url, args.timeout)
    except (OSError, ValueError) as exc:
        if not args.quiet:
            print(f"pymigrate status: {args.url} unreachable: {exc} (is the agent running "
                  "with [metrics] enabled = true?)", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(health, indent=2, default=str), file=out)
    elif not args.quiet:
        print(summarise(health, metrics), file=out)
    return 0 if health.get("healthy") else 1
