"""Re-aggregation for the buffer's degrade-before-drop.

``reaggregate(readings, coarse_rule)`` compacts a run of readings (typically the decoded
oldest LOW-priority chunks) into coarse tumbling-window aggregates. Raw readings are
aggregated exactly (same guarantees as the live aggregator). Finer aggregates already in
the run are merged: each fine window (same device, sensor, rule, window start) is rebuilt
from its finalised values (:meth:`Accumulator.from_summary`) and folded into the coarse
window containing its start; a coarse function is emitted only when every part can supply
it (e.g. ``stddev`` needs the fine ``variance``/``stddev`` plus ``sum`` or ``avg``). LTTB
points pass through unchanged. Coarse windows are complete over the given readings, so
they are not marked partial; a window cut by a chunk boundary yields two aggregates with
the same window that the cloud may merge (``AggInfo.count`` weights them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import msgspec

from agent.aggregate.accumulator import Accumulator
from agent.aggregate.config import RuleConfig, TumblingWindow, percentile_of
from pymigrate.types import AggInfo, Priority, Quality, Reading

__all__ = ["make_degrader", "reaggregate"]

_VAR = ("variance", "stddev", "variance_pop", "stddev_pop")


def _supplies(values: dict[str, float]) -> set[str]:
    have = {"count"}
    for fn in ("min", "max", "first", "last"):
        if fn in values:
            have.add(fn)
    if {"sum", "avg", "mean"} & values.keys():
        have |= {"sum", "avg", "mean"}
        if any(v in values for v in _VAR):
            have |= set(_VAR)
    return have


def reaggregate(readings: Sequence[Reading], coarse_rule: RuleConfig, *,
                priority: Priority | None = None) -> list[Reading]:
    """Compact ``readings`` into coarse aggregates under ``coarse_rule`` (tumbling).

    Output priority: ``priority`` if given, else that of each series' first input.
    Returns aggregates sorted by (device, sensor, window start), then LTTB points.
    """
    w = coarse_rule.window
    if not isinstance(w, TumblingWindow):
        raise ValueError("re-aggregation needs a tumbling coarse rule")
    size = round(w.size_s * 1000)
    alpha = (coarse_rule.percentile_rel_error
             if any(percentile_of(f) is not None for f in coarse_rule.functions) else None)
    name = coarse_rule.rule_name
    # (device, sensor, coarse start) -> [accumulator, computable functions, priority]
    wins: dict[tuple[str, str, int], tuple[Accumulator, set[str], Priority]] = {}
    fine: dict[tuple[str, str, str, int, int, int], dict[str, float]] = {}
    fine_prio: dict[tuple[str, str, str, int, int, int], Priority] = {}
    passthrough: list[Reading] = []
    all_fns = set(coarse_rule.functions)

    def window(dev: str, sensor: str, ts: int, prio: Priority) -> tuple[Accumulator, set[str]]:
        key = (dev, sensor, ts - ts % size)
        slot = wins.get(key)
        if slot is None:
            slot = wins[key] = (Accumulator(alpha), set(all_fns), prio)
        return slot[0], slot[1]

    for r in readings:
        if r.agg is None:
            acc, _ = window(r.device_id, r.sensor, r.ts_ms, r.priority)
            acc.add(r.ts_ms, r.value)
        elif r.agg.fn == "lttb":
            passthrough.append(r)
        else:
            k = (r.device_id, r.sensor, r.agg.rule, r.ts_ms, r.agg.window_end_ms, r.agg.count)
            fine.setdefault(k, {})[r.agg.fn] = float(r.value)
            fine_prio.setdefault(k, r.priority)
    for (dev, sensor, _rule, start, end, n), values in fine.items():
        acc, fns = window(dev, sensor, start, fine_prio[(dev, sensor, _rule, start, end, n)])
        part = Accumulator.from_summary(n, values, ts_first=start, ts_last=end - 1)
        acc.merge(part)
        fns &= _supplies(values)  # percentiles cannot be rebuilt from aggregates
    out: list[Reading] = []
    for (dev, sensor, start), (acc, fns, prio) in sorted(wins.items()):
        for fn in coarse_rule.functions:
            if fn not in fns:
                continue
            v = acc.value(fn)
            if fn in ("first", "last") and math.isnan(v):
                continue
            out.append(Reading(
                device_id=dev, sensor=sensor, ts_ms=start, value=v,
                priority=priority if priority is not None else prio,
                quality=int(Quality.AGGREGATE),
                agg=AggInfo(rule=name, fn=fn, window_end_ms=start + size, count=acc.n)))
    return out + passthrough


def make_degrader(coarse_rule: RuleConfig) -> Callable[[list[Reading]], list[Reading]]:
    """The buffer's degrade-before-drop hook (``agent.buffer`` ``Degrader``).

    Re-aggregates one chunk's readings under ``coarse_rule`` keeping device and priority,
    and gives the aggregates sequence numbers taken from the chunk's own (the lowest
    ones, in order), so every seq stays unique per device and the cloud's (device, seq)
    idempotency holds. Returns ``[]`` (keep the chunk as it is) when compaction would not
    reduce the number of readings.
    """

    def degrade(readings: list[Reading]) -> list[Reading]:
        if not readings:
            return []
        out = reaggregate(readings, coarse_rule, priority=readings[0].priority)
        if len(out) >= len(readings):
            return []
        seqs = sorted(r.seq for r in readings)
        return [msgspec.structs.replace(r, seq=s) for r, s in zip(out, seqs)]

    return degrade
