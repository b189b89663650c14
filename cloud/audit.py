"""``pymigrate cloud completeness``: is the data complete, and if not, why?

    pymigrate cloud completeness [DEVICE] --config cloud.toml [--json]
        [--store sqlite|postgres|influx|timestream] [--sqlite-path P] [--dsn DSN]

For every stream (device and agent instance) the store holds, every sequence number from
the stream's first to the highest the agent reported is accounted for: ``stored``, in a
gap record (``gaps``: reason -> count; what the agent gave up and why), or
``unexplained`` (neither: a loss nobody recorded). ``duplicates`` counts sequence numbers
stored more than once, ``conflicts`` readings whose sequence numbers arrived a second time
with other content (kept apart, see :mod:`cloud.stores.completeness`).

Exit status: 0 when nothing is unexplained and there are no duplicates or conflicts,
1 otherwise, 2 on a usage or config error, 3 when the store cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any, TextIO

import msgspec

from cloud.config import build_store, parse_cloud_config
from cloud.stores.completeness import StreamReport
from pymigrate.configload import load_toml
from pymigrate.errors import ConfigError, PyMigrateError

__all__ = ["device_summary", "format_report", "main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pymigrate cloud completeness",
        description="Account for every sequence number of every device: stored, in a gap "
                    "record (with its reason), or unexplained.")
    p.add_argument("device", nargs="?", help="one device id (default: every device)")
    p.add_argument("--config", help="TOML file with a [cloud] table (the ingest's config)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--store", choices=("sqlite", "postgres", "influx", "timestream"),
                   help="override [cloud] store")
    p.add_argument("--sqlite-path", help="override [cloud.sqlite] path")
    p.add_argument("--dsn", help="override [cloud.postgres] dsn")
    return p


def device_summary(device_id: str, streams: list[StreamReport]) -> dict[str, Any]:
    """One device: its streams summed, plus each stream."""
    gaps: dict[str, int] = {}
    for s in streams:
        for k, v in s.gaps.items():
            gaps[k] = gaps.get(k, 0) + v
    return {
        "device_id": device_id,
        "max_seq": max((s.max_seq for s in streams), default=0),
        "stored": sum(s.stored for s in streams),
        "gaps": gaps,
        "gap_total": sum(gaps.values()),
        "unexplained": sum(s.unexplained for s in streams),
        "duplicates": sum(s.duplicates for s in streams),
        "conflicts": sum(s.conflicts for s in streams),
        "ranges_forgotten": sum(s.ranges_forgotten for s in streams),
        "state_ranges": sum(s.state_ranges for s in streams),
        "instances": len(streams),
        "streams": [msgspec.to_builtins(s) for s in streams],
    }


def format_report(devices: list[dict[str, Any]]) -> str:
    head = ("device", "instance", "seq_base", "max_seq", "stored", "gaps", "unexplained",
            "dups", "conflicts")
    rows = [head]
    for d in devices:
        for s in d["streams"]:
            gaps = ",".join(f"{k}={v}" for k, v in sorted(s["gaps"].items())) or "-"
            rows.append((d["device_id"], s["instance"] or "-", str(s["seq_base"]),
                         str(s["max_seq"]), str(s["stored"]), gaps, str(s["unexplained"]),
                         str(s["duplicates"]), str(s["conflicts"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    for d in devices:
        if d["instances"] > 1:
            lines.append(f"note: {d['device_id']} has {d['instances']} agent instances "
                         "(several gateways configured with one device id, or a buffer that "
                         "was replaced); each stream is accounted on its own")
        for s in d["streams"]:
            if s["unexplained"]:
                lines.append(f"unexplained in {d['device_id']}/{s['instance'] or '-'}: "
                             f"{s['unexplained_runs']} (first runs)")
    return "\n".join(lines)


def _config(ns: argparse.Namespace) -> Any:
    data: dict[str, Any] = {}
    if ns.config:
        data = dict(load_toml(ns.config).get("cloud", {}))
    if ns.sqlite_path:
        data["sqlite"] = {**data.get("sqlite", {}), "path": ns.sqlite_path}
    if ns.dsn:
        data["postgres"] = {**data.get("postgres", {}), "dsn": ns.dsn}
    if ns.store:
        data["store"] = ns.store
    return parse_cloud_config(data)


async def collect(cfg: Any, device: str | None) -> list[dict[str, Any]]:
    """Open the configured store and account every stream (of ``device``)."""
    store = build_store(cfg)
    report = getattr(store, "completeness", None)
    if report is None:
        raise ConfigError("cloud.store", f"the {store.name} store keeps no completeness ledger")
    await store.open()
    try:
        streams: list[StreamReport] = await report(device)
    finally:
        await store.close()
    by_dev: dict[str, list[StreamReport]] = {}
    for s in streams:
        by_dev.setdefault(s.device_id, []).append(s)
    return [device_summary(d, ss) for d, ss in sorted(by_dev.items())]


def main(argv: list[str] | None = None, *, out: TextIO | None = None) -> int:
    """Entry point of ``pymigrate cloud completeness``; returns the exit status."""
    out = out or sys.stdout
    ns = _parser().parse_args(argv)
    try:
        cfg = _config(ns)
        devices = asyncio.run(collect(cfg, ns.device))
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (PyMigrateError, OSError) as exc:
        print(f"error: store unavailable: {exc}", file=sys.stderr)
        return 3
    if ns.json:
        totals = {k: sum(d[k] for d in devices) for k in
                  ("stored", "gap_total", "unexplained", "duplicates", "conflicts")}
        out.write(msgspec.json.encode({"devices": devices, "totals": totals}).decode() + "\n")
    elif devices:
        out.write(format_report(devices) + "\n")
    else:
        out.write("no devices in the store\n")
    bad = any(d["unexplained"] or d["duplicates"] or d["conflicts"] for d in devices)
    return 1 if bad else 0
