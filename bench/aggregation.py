"""Edge aggregation benchmark: ``python -m bench aggregation --dataset CSV [--dataset CSV ...]
[--codec NAME] [--chunk-points N] [--batch-bytes B]``.

Replays each recording (first column ISO 8601 timestamp, every other column a numeric
sensor, empty cell = missing) as one device through :class:`agent.aggregate.Aggregator`
under several rule sets, then seals what would go upstream into chunks of
``--chunk-points`` readings (sequence numbers in output order) and packs them into wire
envelopes of up to ``--batch-bytes``, exactly as the raw stream is measured. It prints:

- ``bandwidth_reduction``: 1 - aggregated envelope bytes / raw envelope bytes (same codec,
  same chunking), and 1 - aggregated envelope bytes / (16 bytes x raw points) (``raw16``);
- for window rule sets, ``max_abs_error`` per statistic: the aggregates *decoded from the
  wire chunks* against the same statistic computed from the raw readings of each window
  (min/max/count exactly, sum against ``math.fsum``, avg/stddev against ``statistics``);
- for deadband and LTTB, the reconstruction error at every raw timestamp (step-hold for
  deadband, linear interpolation for LTTB): max and RMS, absolute (worst sensor) and in
  percent of that sensor's range, and the error of 10-minute min/max/avg recomputed from
  the reconstruction.

Rule sets: ``weather_10min`` and ``weather_1h`` (tumbling, min/max/avg/count, all
sensors), ``weather_1h_sum`` (min/max/sum/count: the cloud derives avg = sum/count, and a
sum of short decimals encodes far smaller than a full-precision mean), ``weather_1h_full``
(min/max/avg/count/sum/stddev), ``deadband`` (abs = 1% of each sensor's observed range,
heartbeat 15 min), ``lttb_1h`` (6 LTTB points per hour).
"""

from __future__ import annotations

import argparse
import bisect
import csv
import math
import statistics
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec

from agent.aggregate import Aggregator, parse_aggregation
from agent.codec import DEFAULT_CODEC, codec_by_name, open_chunk, seal_chunk
from bench.common import emit
from pymigrate.clock import VirtualClock
from pymigrate.envelope import Batch, encode_batch
from pymigrate.types import Chunk, Priority, Reading

DEFAULT_DIRS = (Path("tests/data"), Path(__file__).resolve().parents[2] / "shared" / "data")
STATS_WINDOW_MS = 600_000


def load_csv(path: Path) -> tuple[str, list[str], list[Reading]]:
    """Readings in acceptance order (rows in time order, sensors in column order)."""
    device = path.stem
    out: list[Reading] = []
    with path.open(newline="") as fh:
        rows = csv.reader(fh)
        sensors = next(rows)[1:]
        for row in rows:
            ts_ms = int(datetime.fromisoformat(row[0].replace("Z", "+00:00")).timestamp() * 1000)
            for name, cell in zip(sensors, row[1:]):
                if cell != "":
                    out.append(Reading(device, name, ts_ms, float(cell), Priority.NORMAL))
    return device, sensors, out


def wire_bytes(readings: Sequence[Reading], codec: str, chunk_points: int,
               batch_bytes: int) -> tuple[int, list[Chunk]]:
    """Envelope bytes of the readings, sealed in chunks and packed into batches."""
    if not readings:
        return 0, []
    seqd = [msgspec_replace(r, seq=i + 1) for i, r in enumerate(readings)]
    chunks = [seal_chunk(seqd[i:i + chunk_points], codec)
              for i in range(0, len(seqd), chunk_points)]
    device = readings[0].device_id

    def size(cs: list[Chunk]) -> int:
        return len(encode_batch(Batch(device, uuid.uuid4().hex, cs, 1_767_600_000_000)))

    total, cur = 0, list[Chunk]()
    for c in chunks:
        if cur and size([*cur, c]) > batch_bytes:
            total += size(cur)
            cur = []
        cur.append(c)
    return total + (size(cur) if cur else 0), chunks


def msgspec_replace(r: Reading, **kw: Any) -> Reading:
    return msgspec.structs.replace(r, **kw)


def run_rules(rules: list[dict[str, Any]], readings: list[Reading],
              batch: int = 1000) -> tuple[list[Reading], Any, float]:
    agg = Aggregator(parse_aggregation({"rules": rules}), clock=VirtualClock())
    t0 = time.perf_counter()
    out: list[Reading] = []
    for i in range(0, len(readings), batch):
        out += agg.process(readings[i:i + batch])
    out += agg.flush()
    dt = time.perf_counter() - t0
    return out, agg.stats(), dt


def by_sensor(readings: Sequence[Reading]) -> dict[str, list[Reading]]:
    d: dict[str, list[Reading]] = defaultdict(list)
    for r in readings:
        d[r.sensor].append(r)
    for rs in d.values():
        rs.sort(key=lambda r: r.ts_ms)  # stable: arrival order on equal timestamps
    return d


def window_stats(rs: Sequence[tuple[int, float]], size_ms: int) -> dict[int, dict[str, float]]:
    groups: dict[int, list[float]] = defaultdict(list)
    for ts, v in rs:
        groups[ts - ts % size_ms].append(v)
    res = {}
    for start, vals in groups.items():
        res[start] = {"min": min(vals), "max": max(vals), "count": float(len(vals)),
                      "sum": math.fsum(vals), "avg": statistics.fmean(vals),
                      "stddev": statistics.stdev(vals) if len(vals) > 1 else 0.0}
    return res


def stats_errors(decoded: Sequence[Reading], raw: dict[str, list[Reading]],
                 size_ms: int) -> dict[str, Any]:
    """Max abs (and relative) error of each aggregate vs the raw window statistics."""
    truth = {s: window_stats([(r.ts_ms, r.value) for r in rs], size_ms) for s, rs in raw.items()}
    abs_err: dict[str, float] = defaultdict(float)
    rel_err: dict[str, float] = defaultdict(float)
    windows = 0
    for r in decoded:
        assert r.agg is not None
        t = truth[r.sensor][r.ts_ms]
        want = t["avg"] if r.agg.fn == "avg" else t[r.agg.fn]
        if r.agg.count != t["count"]:
            abs_err["agg_info_count"] = max(abs_err["agg_info_count"],
                                            abs(r.agg.count - t["count"]))
        e = abs(r.value - want)
        abs_err[r.agg.fn] = max(abs_err[r.agg.fn], e)
        if want:
            rel_err[r.agg.fn] = max(rel_err[r.agg.fn], e / abs(want))
        windows += r.agg.fn == "count"
    # avg derived in the cloud as sum / count (when the rule sends sum instead of avg)
    sums: dict[tuple[str, int], dict[str, float]] = defaultdict(dict)
    for r in decoded:
        if r.agg is not None and r.agg.fn in ("sum", "count", "avg"):
            sums[(r.sensor, r.ts_ms)][r.agg.fn] = r.value
    for (sensor, start), got in sums.items():
        if "avg" not in got and "sum" in got and "count" in got:
            want = truth[sensor][start]["avg"]
            e = abs(got["sum"] / got["count"] - want)
            abs_err["avg_from_sum_count"] = max(abs_err["avg_from_sum_count"], e)
            if want:
                rel_err["avg_from_sum_count"] = max(rel_err["avg_from_sum_count"], e / abs(want))
    exact = all(abs_err[f] == 0.0 for f in ("min", "max", "count", "sum") if f in abs_err)
    exact = exact and all(rel_err[f] <= 1e-9 for f in ("avg", "stddev", "avg_from_sum_count")
                          if f in rel_err)
    return {"windows_checked": windows, "max_abs_error": dict(abs_err),
            "max_rel_error": dict(rel_err), "exact_statistics": exact}


def _held(sent: Sequence[Reading], raw: Sequence[Reading]) -> list[float]:
    """Step-hold in arrival order: what was sent is a subsequence of the raw readings
    (deadband sends real samples), so each raw reading is held at the last sent one
    at or before it. Arrival order, not timestamps, so duplicate timestamps are fair."""
    out, j, cur = [], 0, math.nan
    for r in raw:
        if j < len(sent) and sent[j].ts_ms == r.ts_ms and sent[j].value == r.value:
            cur = sent[j].value
            j += 1
        out.append(cur)
    if j != len(sent):
        raise AssertionError("sent readings are not a subsequence of the raw readings")
    return out


def _interp(sent: Sequence[Reading], raw: Sequence[Reading]) -> list[float]:
    """Linear interpolation between kept points (sorted by time) at each raw timestamp."""
    ks = sorted(sent, key=lambda k: k.ts_ms)
    kts = [k.ts_ms for k in ks]
    out = []
    for r in raw:
        j = bisect.bisect_right(kts, r.ts_ms) - 1
        if j < 0:
            v = ks[0].value
        elif j + 1 >= len(ks) or kts[j + 1] == kts[j]:
            v = ks[j].value
        else:
            a, b = ks[j], ks[j + 1]
            v = a.value + (b.value - a.value) * (r.ts_ms - a.ts_ms) / (b.ts_ms - a.ts_ms)
        out.append(v)
    return out


def reconstruction(sent: Sequence[Reading], raw_arrival: dict[str, list[Reading]], mode: str,
                   bounds: dict[str, float] | None = None) -> dict[str, Any]:
    """Error of step-hold / linear reconstruction at every raw reading."""
    kept: dict[str, list[Reading]] = defaultdict(list)
    for r in sent:
        kept[r.sensor].append(r)
    worst_abs = worst_pct = 0.0
    worst_sensor = ""
    sq_pct = 0.0
    n = 0
    rms_abs_by_sensor: dict[str, float] = {}
    stat_err: dict[str, float] = defaultdict(float)
    stat_err_pct: dict[str, float] = defaultdict(float)
    violations = 0
    for s, rs in raw_arrival.items():
        ks = kept.get(s, [])
        rec = _held(ks, rs) if mode == "step" else _interp(ks, rs)
        lo, hi = min(r.value for r in rs), max(r.value for r in rs)
        rng = (hi - lo) or 1.0
        sq = 0.0
        for r, v in zip(rs, rec):
            e = abs(v - r.value)
            sq += e * e
            sq_pct += (100 * e / rng) ** 2
            n += 1
            if bounds is not None and e > bounds[s]:
                violations += 1
            if e > worst_abs:
                worst_abs, worst_sensor = e, s
            worst_pct = max(worst_pct, 100 * e / rng)
        rms_abs_by_sensor[s] = math.sqrt(sq / len(rs))
        truth = window_stats([(r.ts_ms, r.value) for r in rs], STATS_WINDOW_MS)
        approx = window_stats([(r.ts_ms, v) for r, v in zip(rs, rec)], STATS_WINDOW_MS)
        for start, t in truth.items():
            for fn in ("min", "max", "avg"):
                e = abs(approx[start][fn] - t[fn])
                stat_err[fn] = max(stat_err[fn], e)
                stat_err_pct[fn] = max(stat_err_pct[fn], 100 * e / rng)
    res: dict[str, Any] = {
        "method": "step-hold" if mode == "step" else "linear interpolation",
        "max_abs_error": worst_abs, "max_abs_error_sensor": worst_sensor,
        "max_error_pct_of_range": worst_pct,
        "rms_abs_error_worst_sensor": max(rms_abs_by_sensor.values(), default=0.0),
        "rms_error_pct_of_range": math.sqrt(sq_pct / n) if n else 0.0,
        "stats_10min_from_reconstruction": {"max_abs_error": dict(stat_err),
                                            "max_error_pct_of_range": dict(stat_err_pct)},
    }
    if bounds is not None:
        res["readings_outside_deadband"] = violations
    return res


def rule_sets(raw: dict[str, list[Reading]]) -> dict[str, list[dict[str, Any]]]:
    basic = ["min", "max", "avg", "count"]
    deadband = []
    for s, rs in sorted(raw.items()):
        span = max(r.value for r in rs) - min(r.value for r in rs)
        deadband.append({"name": f"db_{s}", "match": s,
                         "window": {"type": "deadband", "abs": 0.01 * span,
                                    "heartbeat_s": 900}})
    return {
        "weather_10min": [{"name": "w10m", "match": "*",
                           "window": {"type": "tumbling", "size_s": 600}, "functions": basic}],
        "weather_1h": [{"name": "w1h", "match": "*",
                        "window": {"type": "tumbling", "size_s": 3600}, "functions": basic}],
        "weather_1h_sum": [{"name": "w1hs", "match": "*",
                            "window": {"type": "tumbling", "size_s": 3600},
                            "functions": ["min", "max", "sum", "count"]}],
        "weather_1h_full": [{"name": "w1hf", "match": "*",
                             "window": {"type": "tumbling", "size_s": 3600},
                             "functions": [*basic, "sum", "stddev"]}],
        "deadband": deadband,
        "lttb_1h": [{"name": "lttb1h", "match": "*",
                     "window": {"type": "tumbling", "size_s": 3600}, "lttb": 6}],
    }


def bench_dataset(path: Path, codec: str, chunk_points: int, batch_bytes: int) -> dict[str, Any]:
    _, sensors, readings = load_csv(path)
    raw = by_sensor(readings)
    arrival: dict[str, list[Reading]] = defaultdict(list)
    for r in readings:
        arrival[r.sensor].append(r)
    raw_wire, _ = wire_bytes(readings, codec, chunk_points, batch_bytes)
    raw16 = 16 * len(readings)
    res: dict[str, Any] = {
        "dataset": path.name, "sensors": len(sensors), "raw_points": len(readings),
        "raw_wire_bytes": raw_wire, "raw16_bytes": raw16,
        "raw_wire_bytes_per_point": raw_wire / len(readings), "rule_sets": {}}
    for name, rules in rule_sets(raw).items():
        out, st, dt = run_rules(rules, readings)
        wire, chunks = wire_bytes(out, codec, chunk_points, batch_bytes)
        decoded = [r for c in chunks for r in open_chunk(c)]
        entry: dict[str, Any] = {
            "readings_out": len(out), "wire_bytes": wire,
            "bandwidth_reduction": {"vs_raw_same_codec": 1 - wire / raw_wire,
                                    "vs_raw16": 1 - wire / raw16},
            "aggregation_ratio": st.aggregation_ratio,
            "late": st.late, "partial_windows": st.partial_windows,
            "aggregator_readings_per_s": round(len(readings) / dt) if dt else None,
        }
        window = rules[0]["window"]
        if name.startswith("weather"):
            entry.update(stats_errors(decoded, raw, round(window["size_s"] * 1000)))
        elif name == "deadband":
            bounds = {r["match"]: r["window"]["abs"] for r in rules}
            rec = reconstruction(decoded, arrival, "step", bounds)
            entry["reconstruction"] = rec
            entry["deadband_bound_respected"] = rec["readings_outside_deadband"] == 0
        else:
            entry["reconstruction"] = reconstruction(decoded, arrival, "linear")
        res["rule_sets"][name] = entry
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench aggregation", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", action="append", type=Path,
                    help="replay-format CSV (repeatable); default: every CSV in tests/data "
                         "or ../shared/data")
    ap.add_argument("--codec", default=DEFAULT_CODEC)
    ap.add_argument("--chunk-points", type=int, default=600)
    ap.add_argument("--batch-bytes", type=int, default=65536)
    args = ap.parse_args(argv)
    codec_by_name(args.codec)
    paths: list[Path] = args.dataset or []
    if not paths:
        for d in DEFAULT_DIRS:
            paths = sorted(d.glob("*.csv"))
            if paths:
                break
    if not paths:
        ap.error("no --dataset given and no CSV in tests/data or ../shared/data")
    results = [bench_dataset(p, args.codec, args.chunk_points, args.batch_bytes) for p in paths]
    summary: dict[str, Any] = {}
    for name in results[0]["rule_sets"]:
        per: dict[str, Any] = {}
        for r in results:
            e = r["rule_sets"][name]
            per[r["dataset"]] = {
                "vs_raw_same_codec": round(e["bandwidth_reduction"]["vs_raw_same_codec"], 4),
                "vs_raw16": round(e["bandwidth_reduction"]["vs_raw16"], 4)}
            if "windows_checked" in e:
                # raw readings per series per window: what bounds the reduction
                per[r["dataset"]]["raw_points_per_window"] = round(
                    r["raw_points"] / max(1, e["windows_checked"]), 1)
                per[r["dataset"]]["exact_statistics"] = e["exact_statistics"]
        summary[name] = per
    emit("aggregation",
         {"datasets": [str(p) for p in paths], "codec": args.codec,
          "chunk_points": args.chunk_points, "batch_bytes": args.batch_bytes,
          "deadband": "abs = 1% of each sensor's observed range, heartbeat 900 s",
          "lttb": "6 points per 1 h tumbling window, linear interpolation"},
         {"summary": summary, "datasets": results})
    return 0
