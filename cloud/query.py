"""``pymigrate cloud query``: print a device's series for a time range (checks, debugging).

    pymigrate cloud query DEVICE [--config cloud.toml] [--sensor S]
        [--start T] [--end T | --last 2h] [--agg D] [--format table|json] [--limit N]
        [--store sqlite|postgres|influx] [--sqlite-path P] [--dsn DSN] [--schema S]
        [--influx-url URL] [--influx-db DB]

``--agg D`` (e.g. ``1h``, ``15m``) prints, per sensor and bucket of width D (aligned to the
epoch), the ``min, max, avg, sum, count`` of the values instead of the readings; the time
range is widened to whole buckets. On TimescaleDB ``--agg 1h`` reads the continuous
aggregate ``readings_1h`` (refreshed over the range first, so late readings count); on
PostgreSQL and SQLite it is one ``GROUP BY`` in SQL; other stores aggregate the queried
readings here.

``T`` is milliseconds since the epoch or an ISO 8601 time (UTC when no offset is given).
The store comes from the ``[cloud]`` table of the config file, overridden by the flags.
Exit status: 0 with rows, 1 when nothing matched, 2 on a usage or config error, 3 when
the store cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import re
import sys
from pathlib import Path
from typing import Any, TextIO

import msgspec

from cloud.config import CloudConfig, build_store, parse_cloud_config
from cloud.stores.base import AggregateRow
from pymigrate.configload import load_toml
from pymigrate.errors import ConfigError, PyMigrateError
from pymigrate.types import Quality, Reading

__all__ = ["aggregate_readings", "format_agg_table", "format_table", "main",
           "parse_duration_ms", "parse_time_ms", "quality_names"]

_DUR = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_time_ms(text: str) -> int:
    """Epoch milliseconds from an integer or an ISO 8601 string (naive = UTC)."""
    if re.fullmatch(r"-?\d+", text.strip()):
        return int(text)
    try:
        t = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"not a time: {text!r} (epoch ms or ISO 8601)") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return int(t.timestamp() * 1000)


def parse_duration_ms(text: str) -> int:
    m = _DUR.match(text.strip())
    if not m:
        raise ValueError(f"not a duration: {text!r} (e.g. 90s, 15m, 2h, 1d)")
    return int(float(m.group(1)) * _UNIT_MS[m.group(2)])


def _iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).isoformat(timespec="milliseconds")


def quality_names(q: int) -> str:
    """Quality flags by name (``time_corrected+late``), ``-`` for none, unknown bits as a
    number: a bare integer means nothing to a reader."""
    if not q:
        return "-"
    names = [f.name.lower() for f in Quality if f.value and q & f.value and f.name]
    rest = q & ~sum(f.value for f in Quality)
    return "+".join(names + ([str(rest)] if rest else []))


def format_table(readings: list[Reading]) -> str:
    """Fixed-width table: time, sensor, value, seq, priority, quality, aggregate."""
    head = ("time_utc", "sensor", "value", "seq", "prio", "quality", "agg")
    rows = [head]
    for r in readings:
        agg = f"{r.agg.fn}/{r.agg.rule} n={r.agg.count}" if r.agg else ""
        rows.append((_iso(r.ts_ms), r.sensor, repr(r.value), str(r.seq), r.priority.name.lower(),
                     quality_names(r.quality), agg))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                     for row in rows)


def aggregate_readings(readings: list[Reading], bucket_ms: int) -> list[AggregateRow]:
    """The ``--agg`` rows computed from readings (stores without an aggregate query)."""
    groups: dict[tuple[str, int], list[float]] = {}
    for r in readings:
        groups.setdefault((r.sensor, r.ts_ms - r.ts_ms % bucket_ms), []).append(r.value)
    return [AggregateRow(s, b, min(v), max(v), sum(v) / len(v), sum(v), len(v))
            for (s, b), v in sorted(groups.items())]


def format_agg_table(rows: list[AggregateRow]) -> str:
    """Fixed-width table: bucket start, sensor, min, max, avg, sum, count."""
    head = ("bucket_utc", "sensor", "min", "max", "avg", "sum", "count")
    out = [head] + [(_iso(a.bucket_ms), a.sensor, repr(a.min), repr(a.max), repr(a.avg),
                     repr(a.sum), str(a.count)) for a in rows]
    widths = [max(len(row[i]) for row in out) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                     for row in out)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pymigrate cloud query",
                                description="Print a device's series for a time range.")
    p.add_argument("device")
    p.add_argument("--config", help="TOML file with a [cloud] table")
    p.add_argument("--sensor")
    p.add_argument("--start", help="epoch ms or ISO 8601 (inclusive)")
    end = p.add_mutually_exclusive_group()
    end.add_argument("--end", help="epoch ms or ISO 8601 (exclusive)")
    end.add_argument("--last", help="duration D: [now-D, now), or [start, start+D) with --start")
    p.add_argument("--agg", metavar="D",
                   help="per sensor and bucket of width D (e.g. 1h): min/max/avg/sum/count")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--limit", type=int, default=0, help="print at most N rows (0 = all)")
    p.add_argument("--store", choices=("sqlite", "postgres", "influx", "timestream"))
    p.add_argument("--sqlite-path")
    p.add_argument("--dsn")
    p.add_argument("--schema")
    p.add_argument("--influx-url")
    p.add_argument("--influx-db")
    return p


def _config(ns: argparse.Namespace) -> CloudConfig:
    data: dict[str, Any] = {}
    if ns.config:
        doc = load_toml(ns.config)
        data = dict(doc.get("cloud", {}))
    for flag, section, key in (("sqlite_path", "sqlite", "path"), ("dsn", "postgres", "dsn"),
                               ("schema", "postgres", "schema"),
                               ("influx_url", "influx", "url"), ("influx_db", "influx", "db")):
        value = getattr(ns, flag)
        if value is not None:
            data[section] = {**data.get(section, {}), key: value}
    if ns.store:
        data["store"] = ns.store
    return parse_cloud_config(data)


async def _run(ns: argparse.Namespace, cfg: CloudConfig, out: TextIO) -> int:
    start = parse_time_ms(ns.start) if ns.start else None
    end = parse_time_ms(ns.end) if ns.end else None
    if ns.last:
        end = start + parse_duration_ms(ns.last) if start is not None else None
        if start is None:
            start = dt_now_ms() - parse_duration_ms(ns.last)
    if ns.agg:
        return await _run_agg(ns, cfg, out, start, end, parse_duration_ms(ns.agg))
    store = build_store(cfg)
    await store.open()
    try:
        rows = await store.query(ns.device, ns.sensor, start, end)
    finally:
        await store.close()
    shown = rows[: ns.limit] if ns.limit > 0 else rows
    if ns.format == "json":
        doc = {"device_id": ns.device, "sensor": ns.sensor, "start_ms": start, "end_ms": end,
               "count": len(rows), "readings": shown}
        out.write(msgspec.json.encode(doc).decode() + "\n")
    else:
        out.write(format_table(shown) + "\n")
        out.write(f"({len(rows)} readings{'' if shown is rows else f', {len(shown)} shown'})\n")
    return 0 if rows else 1


async def _run_agg(ns: argparse.Namespace, cfg: CloudConfig, out: TextIO, start: int | None,
                   end: int | None, bucket_ms: int) -> int:
    if bucket_ms <= 0:
        raise ValueError("--agg must be a positive duration")
    store = build_store(cfg)
    await store.open()
    try:
        agg = getattr(store, "aggregate", None)
        if agg is not None:
            rows: list[AggregateRow] = await agg(ns.device, ns.sensor, start, end, bucket_ms)
        else:
            lo = None if start is None else start - start % bucket_ms
            hi = None if end is None else -((-end) // bucket_ms) * bucket_ms
            rows = aggregate_readings(await store.query(ns.device, ns.sensor, lo, hi),
                                      bucket_ms)
    finally:
        await store.close()
    shown = rows[: ns.limit] if ns.limit > 0 else rows
    if ns.format == "json":
        doc = {"device_id": ns.device, "sensor": ns.sensor, "start_ms": start, "end_ms": end,
               "bucket_ms": bucket_ms, "count": len(rows), "buckets": shown}
        out.write(msgspec.json.encode(doc).decode() + "\n")
    else:
        out.write(format_agg_table(shown) + "\n")
        out.write(f"({len(rows)} buckets{'' if shown is rows else f', {len(shown)} shown'})\n")
    return 0 if rows else 1


def dt_now_ms() -> int:
    return int(dt.datetime.now(tz=dt.UTC).timestamp() * 1000)


def main(argv: list[str] | None = None, *, out: TextIO | None = None) -> int:
    """Entry point of ``pymigrate cloud query``; returns the exit status."""
    out = out or sys.stdout
    ns = _parser().parse_args(argv)
    try:
        cfg = _config(ns)
        if cfg.store == "sqlite" and not Path(cfg.sqlite.path).exists():  # do not create one
            raise ConfigError("cloud.sqlite.path", f"no store at {cfg.sqlite.path} (relative "
                              f"to {Path.cwd()}): run from the folder where the ingest ran, "
                              "or pass --config / --sqlite-path")
        return asyncio.run(_run(ns, cfg, out))
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (PyMigrateError, OSError) as exc:
        print(f"error: store unavailable: {exc}", file=sys.stderr)
        return 3
