"""Scenario reports from the simulator's ground truth: a table, JSON and an optional chart.

Ground truth: every generator counts what it produced; the cloud side records the first
arrival of every chunk; the store is queried at the end. ``lost`` is what was accepted
(committed in a device buffer) and is neither stored in the cloud, nor evicted by the
documented policy, nor dead-lettered, nor quarantined, nor still buffered: it must be 0.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from simulators.fleet import Fleet

__all__ = ["Report", "build_report", "render_table", "write_chart", "weighted_percentiles"]


class Report(msgspec.Struct, kw_only=True):
    """Outcome of one scenario run (all counts are readings unless named otherwise)."""

    scenario: str
    devices: int
    hours: float
    seed: int
    produced: int = 0
    produced_by_priority: dict[str, int] = msgspec.field(default_factory=dict)
    rejected_invalid: int = 0
    edge_duplicates_dropped: int = 0
    accepted: int = 0
    delivered: int = 0
    delivered_by_priority: dict[str, int] = msgspec.field(default_factory=dict)
    stored_rows: int = 0
    duplicates_stored: int = 0
    evicted: dict[str, int] = msgspec.field(default_factory=dict)
    evicted_by_priority: dict[str, int] = msgspec.field(default_factory=dict)
    dead_lettered: int = 0
    quarantined: int = 0
    still_buffered: int = 0
    lost: int = 0
    unexplained_extra: int = 0
    wire_bytes: int = 0
    attempts: int = 0
    batches_ok: int = 0
    batches_failed: int = 0
    batches_throttled: int = 0
    lag_s: dict[str, float] = msgspec.field(default_factory=dict)
    lag_p99_by_priority_s: dict[str, float] = msgspec.field(default_factory=dict)
    peak_buffer_bytes: int = 0
    peak_payload_bytes: int = 0
    peak_state_dir_bytes: int = 0
    peak_memory_bytes: int = 0  # whole simulation (all devices + cloud), traced peak
    peak_agent_heap_bytes: int = 0  # per device: live Python heap allocated by agent code
    cpu_by_stage: dict[str, float] = msgspec.field(default_factory=dict)
    drained_at_h: float | None = None
    all_delivered: bool = False
    battery_min_pct: float | None = None
    wall_s: float = 0.0
    extra: dict[str, Any] = msgspec.field(default_factory=dict)
    timeline: list[dict[str, float]] = msgspec.field(default_factory=list)

    def to_json(self, *, timeline: bool = False) -> bytes:
        data = msgspec.to_builtins(self)
        if not timeline:
            data.pop("timeline", None)
        return msgspec.json.format(msgspec.json.encode(data), indent=2)


def weighted_percentiles(samples: list[tuple[float, int]],
                         qs: tuple[float, ...] = (50, 95, 99)) -> dict[str, float]:
    """Percentiles of values weighted by counts (e.g. chunk lag weighted by readings)."""
    if not samples:
        return {}
    data = sorted(samples)
    total = sum(w for _, w in data)
    out: dict[str, float] = {}
    for q in qs:
        target = total * q / 100.0
        acc = 0
        for v, w in data:
            acc += w
            if acc >= target:
                out[f"p{q:g}"] = round(v, 1)
                break
    out["max"] = round(data[-1][0], 1)
    return out


_PRIO = ("critical", "high", "normal", "low")


async def build_report(fleet: Fleet, *, hours: float, drained_at: float | None) -> Report:
    """Collect the ground truth of a finished run."""
    rep = Report(scenario=fleet.name, devices=len(fleet.devices), hours=hours,
                 seed=fleet.seed)
    db = fleet.cloud.store.db
    rows: dict[str, tuple[int, int]] = {}
    async with db.execute(
            "SELECT device_id, count(*), count(DISTINCT sensor || '|' || ts_ms || '|' || "
            "coalesce(agg_rule, '') || '|' || coalesce(agg_fn, '')) FROM readings "
            "GROUP BY device_id") as cur:
        async for dev, n, distinct in cur:
            rows[str(dev)] = (int(n), int(distinct))
    by_prio: Counter[str] = Counter()
    async with db.execute("SELECT priority, count(*) FROM readings GROUP BY 1") as cur:
        async for p, n in cur:
            by_prio[_PRIO[int(p)] if 0 <= int(p) < 4 else str(p)] += int(n)
    rep.delivered_by_priority = dict(by_prio)
    produced_by: Counter[str] = Counter()
    evicted: Counter[str] = Counter()
    for d in fleet.devices:
        t = d.live()
        produced = sum(g.produced for g in d.generators)
        for g in d.generators:
            produced_by.update(g.by_priority)
        n_rows, distinct = rows.get(d.id, (0, 0))
        quarantined = d.quarantined_readings()
        ev = sum(d.evicted.values())
        evicted.update(d.evicted)
        buffered = d.still_buffered
        rep.produced += produced
        rep.rejected_invalid += t.get("rejected", 0)
        rep.edge_duplicates_dropped += t.get("duplicates_dropped", 0)
        rep.accepted += t.get("accepted", 0)
        rep.stored_rows += n_rows
        rep.delivered += distinct
        rep.duplicates_stored += n_rows - distinct
        rep.dead_lettered += t.get("dead_lettered", 0)
        rep.quarantined += quarantined
        rep.still_buffered += buffered
        rep.batches_failed += t.get("batches_failed", 0)
        rep.batches_throttled += t.get("batches_throttled", 0)
        gap = t.get("accepted", 0) - distinct - ev - t.get("dead_lettered", 0) \
            - quarantined - buffered
        if gap > 0:
            rep.lost += gap
        else:
            rep.unexplained_extra += -gap
        rep.peak_buffer_bytes = max(rep.peak_buffer_bytes, d.peak_buffer_bytes)
        rep.peak_payload_bytes = max(rep.peak_payload_bytes, d.peak_payload_bytes)
        rep.peak_state_dir_bytes = max(rep.peak_state_dir_bytes, d.quota.peak_dir_bytes)
        if d.battery is not None:
            pct = round(d.battery.pct, 2)
            rep.battery_min_pct = pct if rep.battery_min_pct is None else min(
                rep.battery_min_pct, pct)
    rep.produced_by_priority = dict(produced_by)
    rep.evicted = dict(evicted)
    ev_prio: Counter[str] = Counter()
    for k, v in evicted.items():
        ev_prio[k.split(":", 1)[1]] += v
    rep.evicted_by_priority = dict(ev_prio)
    rep.wire_bytes = sum(u.wire_bytes for u in fleet.uplinks.values())
    rep.attempts = sum(u.attempts for u in fleet.uplinks.values())
    rep.batches_ok = fleet.cloud.ok_batches
    dl = fleet.cloud.deliveries
    rep.lag_s = weighted_percentiles([(lag, n) for _, lag, n, _ in dl])
    for p in range(4):
        pq = weighted_percentiles([(lag, n) for _, lag, n, pp in dl if pp == p], (99,))
        if pq:
            rep.lag_p99_by_priority_s[_PRIO[p]] = pq["p99"]
    rep.peak_memory_bytes = fleet.peak_mem
    rep.peak_agent_heap_bytes = fleet.peak_agent_heap
    rep.drained_at_h = None if drained_at is None else round(drained_at / 3600.0, 3)
    rep.all_delivered = drained_at is not None and rep.still_buffered == 0
    rep.timeline = fleet.timeline
    return rep


def _mb(n: float) -> str:
    return f"{n / 1e6:,.3f} MB"


def render_table(rep: Report) -> str:
    """A readable, aligned summary for people."""
    lag = rep.lag_s
    rows: list[tuple[str, str]] = [
        ("scenario", f"{rep.scenario}  ({rep.devices} devices, {rep.hours:g} h, "
                     f"seed {rep.seed})"),
        ("readings produced", f"{rep.produced:,}  {_fmt(rep.produced_by_priority)}"),
        ("rejected (invalid)", f"{rep.rejected_invalid:,}"),
        ("duplicates dropped at edge", f"{rep.edge_duplicates_dropped:,}"),
        ("accepted (durable)", f"{rep.accepted:,}"),
        ("delivered (in store)", f"{rep.delivered:,}  {_fmt(rep.delivered_by_priority)}"),
        ("duplicates stored", f"{rep.duplicates_stored:,}"),
        ("evicted by policy", f"{sum(rep.evicted.values()):,}  {_fmt(rep.evicted)}"),
        ("dead-lettered / quarantined", f"{rep.dead_lettered:,} / {rep.quarantined:,}"),
        ("still buffered", f"{rep.still_buffered:,}"),
        ("LOST", f"{rep.lost:,}" + (f"  (unexplained extra {rep.unexplained_extra:,})"
                                    if rep.unexplained_extra else "")),
        ("bytes on the wire", f"{_mb(rep.wire_bytes)}  "
                              f"({rep.wire_bytes / max(rep.delivered, 1):.2f} B/reading)"),
        ("attempts / ok / failed / throttled",
         f"{rep.attempts:,} / {rep.batches_ok:,} / {rep.batches_failed:,} / "
         f"{rep.batches_throttled:,}"),
        ("delivery lag", "  ".join(f"{k} {_dur(v)}" for k, v in lag.items()) or "-"),
        ("lag p99 by priority", "  ".join(f"{k} {_dur(v)}"
                                          for k, v in rep.lag_p99_by_priority_s.items()) or "-"),
        ("peak buffer file (per device)", f"{_mb(rep.peak_buffer_bytes)}  (payload "
                                          f"{_mb(rep.peak_payload_bytes)})"),
        ("peak state dir (per device)", _mb(rep.peak_state_dir_bytes)),
        ("peak memory (traced)", f"simulation {_mb(rep.peak_memory_bytes)}, agent heap per "
                                 f"device {_mb(rep.peak_agent_heap_bytes)}"
         if rep.peak_memory_bytes else "not measured (--memory)"),
        ("all delivered", f"{rep.all_delivered}" + (f" (at {rep.drained_at_h:g} h)"
                                                    if rep.drained_at_h is not None else "")),
    ]
    if rep.battery_min_pct is not None:
        rows.append(("battery (lowest)", f"{rep.battery_min_pct:g} %"))
    if rep.cpu_by_stage:
        rows.append(("CPU s by stage", _fmt(rep.cpu_by_stage)))
    for k, v in rep.extra.items():
        rows.append((k.replace("_", " "), _fmt(v) if isinstance(v, dict) else str(v)))
    rows.append(("wall time", f"{rep.wall_s:g} s"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _fmt(d: dict[str, Any]) -> str:
    if not d:
        return ""
    return "(" + ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}"
                           for k, v in d.items()) + ")"


def _dur(s: float) -> str:
    if not math.isfinite(s):
        return str(s)
    if s < 120:
        return f"{s:.1f}s"
    if s < 7200:
        return f"{s / 60:.1f}m"
    return f"{s / 3600:.2f}h"


def write_chart(rep: Report, path: str | Path) -> bool:
    """Backlog, delivered readings and bandwidth over time as a PNG; False (and no file)
    when matplotlib is not installed (``pip install pymigrate-iot[sim]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    tl = rep.timeline
    if not tl:
        return False
    t = [p["t_h"] for p in tl]
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    axes[0].plot(t, [p["backlog_bytes"] / 1e6 for p in tl])
    axes[0].set_ylabel("backlog (MB)")
    axes[1].plot(t, [p["delivered"] for p in tl])
    axes[1].set_ylabel("delivered readings")
    bw = [0.0] + [max(0.0, (b["wire_bytes"] - a["wire_bytes"]) * 8
                      / max(1e-9, (b["t_h"] - a["t_h"]) * 3600)) / 1000
                  for a, b in itertools.pairwise(tl)]
    axes[2].plot(t, bw)
    axes[2].set_ylabel("bandwidth (kbit/s)")
    axes[2].set_xlabel("simulated hours")
    fig.suptitle(f"{rep.scenario}: {rep.devices} devices, {rep.hours:g} h")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
