"""LTTB shape, re-aggregation for degrade-before-drop, and metadata through the codec."""

from __future__ import annotations

import math
import random
import statistics

import msgspec
import pytest

from agent.aggregate import (
    Aggregator,
    lttb_indices,
    make_degrader,
    parse_aggregation,
    parse_rule,
    reaggregate,
)
from agent.codec import open_chunk, seal_chunk
from pymigrate.clock import VirtualClock
from pymigrate.types import AggInfo, Priority, Quality, Reading

T0 = 1_767_225_600_000
HOUR = 3_600_000


def R(ts: int, v: float, sensor: str = "temp", prio: Priority = Priority.LOW) -> Reading:
    return Reading(device_id="dev1", sensor=sensor, ts_ms=ts, value=v, priority=prio)


# ---- LTTB -------------------------------------------------------------------------------


def test_lttb_keeps_first_last_and_spikes() -> None:
    rng = random.Random(1)
    n = 5000
    vs = [rng.gauss(0, 0.1) for _ in range(n)]
    spikes = {777: 40.0, 2500: -35.0, 4100: 25.0}
    for i, v in spikes.items():
        vs[i] = v
    ts = [float(i) for i in range(n)]
    keep = lttb_indices(ts, vs, 100)
    assert len(keep) == 100
    assert keep[0] == 0 and keep[-1] == n - 1
    assert keep == sorted(set(keep))
    assert set(spikes) <= set(keep)
    assert max(vs[i] for i in keep) == max(vs) and min(vs[i] for i in keep) == min(vs)


def test_lttb_keeps_shape_where_decimation_misses_it() -> None:
    n = 2000
    ts = [float(i) for i in range(n)]
    vs = [math.sin(i / 50) + (3.0 if 1000 <= i < 1003 else 0.0) for i in range(n)]
    keep = lttb_indices(ts, vs, 60)
    every = list(range(0, n, n // 60))
    assert max(vs[i] for i in every) < 1.01  # plain decimation loses the spike
    assert max(vs[i] for i in keep) > 3.5
    # both troughs and crests of the sine survive (within 2% of the extremes)
    assert min(vs[i] for i in keep) < -0.98 and max(vs[i] for i in keep if i < 900) > 0.98


def test_lttb_edge_cases() -> None:
    assert lttb_indices([0, 1, 2], [1, 2, 3], 10) == [0, 1, 2]
    assert lttb_indices([], [], 3) == []
    assert lttb_indices([0, 1, 2, 3, 4], [0, 5, 0, 0, 0], 3) == [0, 1, 4]
    with pytest.raises(ValueError):
        lttb_indices([0, 1], [1], 3)
    with pytest.raises(ValueError):
        lttb_indices(list(range(10)), list(range(10)), 2)


# ---- re-aggregation ---------------------------------------------------------------------

COARSE = parse_rule({"name": "coarse", "match": "*",
                     "window": {"type": "tumbling", "size_s": 3600},
                     "functions": ["min", "max", "sum", "count", "avg", "stddev", "first",
                                   "last", "p50"]})


def _raw(hours: int = 3, seed: int = 2) -> list[Reading]:
    rng = random.Random(seed)
    return [R(T0 + i * 10_000, 15 + rng.gauss(0, 2)) for i in range(hours * 360)]


def test_reaggregate_raw_chunk_is_exact() -> None:
    raw = _raw()
    out = reaggregate(raw, COARSE)
    assert {r.agg.rule for r in out if r.agg} == {"coarse"}
    for h in range(3):
        vals = [r.value for r in raw if T0 + h * HOUR <= r.ts_ms < T0 + (h + 1) * HOUR]
        got = {r.agg.fn: r for r in out if r.ts_ms == T0 + h * HOUR and r.agg}
        assert got["sum"].value == math.fsum(vals)
        assert got["count"].value == len(vals) and got["count"].agg.count == len(vals)  # type: ignore[union-attr]
        assert got["min"].value == min(vals) and got["max"].value == max(vals)
        assert math.isclose(got["stddev"].value, statistics.stdev(vals), rel_tol=1e-9)
        assert abs(got["p50"].value - statistics.median_low(vals)) <= 0.01 * 20
        assert got["sum"].priority == Priority.LOW
        assert got["sum"].quality == Quality.AGGREGATE
        assert got["sum"].agg.window_end_ms == T0 + (h + 1) * HOUR  # type: ignore[union-attr]


def test_reaggregate_fine_aggregates_into_coarse() -> None:
    raw = _raw()
    fine_cfg = parse_aggregation({"rules": [{
        "name": "fine", "match": "*", "window": {"type": "tumbling", "size_s": 600},
        "functions": ["min", "max", "sum", "count", "variance", "first", "last"], "lttb": 4}]})
    agg = Aggregator(fine_cfg, clock=VirtualClock())
    fine = agg.process(raw) + agg.flush()
    out = reaggregate(fine, COARSE, priority=Priority.NORMAL)
    lttb = [r for r in out if r.agg and r.agg.fn == "lttb"]
    assert len(lttb) == 18 * 4  # passed through
    coarse = [r for r in out if r.agg and r.agg.rule == "coarse"]
    assert {r.agg.fn for r in coarse if r.agg} == {"min", "max", "sum", "count", "avg",
                                                  "stddev", "first", "last"}  # no p50
    for h in range(3):
        vals = [r.value for r in raw if T0 + h * HOUR <= r.ts_ms < T0 + (h + 1) * HOUR]
        got = {r.agg.fn: r.value for r in coarse if r.ts_ms == T0 + h * HOUR and r.agg}
        assert got["count"] == len(vals)
        assert got["min"] == min(vals) and got["max"] == max(vals)
        assert math.isclose(got["sum"], math.fsum(vals), rel_tol=1e-12)
        assert math.isclose(got["avg"], statistics.mean(vals), rel_tol=1e-12)
        assert math.isclose(got["stddev"], statistics.stdev(vals), rel_tol=1e-9)
        assert got["first"] == vals[0] and got["last"] == vals[-1]
    assert all(r.priority == Priority.NORMAL for r in coarse)


def test_reaggregate_mixed_and_limited_inputs() -> None:
    # a fine window with only avg+count can give sum/avg but no stddev or min
    fine = [Reading(device_id="dev1", sensor="temp", ts_ms=T0, value=v, priority=Priority.LOW,
                    quality=int(Quality.AGGREGATE), agg=AggInfo("f", fn, T0 + 600_000, 10))
            for fn, v in (("avg", 2.0), ("count", 10.0))]
    raw = [R(T0 + 700_000, 5.0)]
    out = reaggregate(fine + raw, COARSE)
    got = {r.agg.fn: r.value for r in out if r.agg}
    assert got == {"sum": 25.0, "count": 11.0, "avg": 25.0 / 11}
    with pytest.raises(ValueError):
        reaggregate(raw, parse_rule({"match": "*", "window": {"type": "count", "count": 3},
                                     "functions": ["sum"]}))


# ---- metadata survives the codec --------------------------------------------------------


@pytest.mark.parametrize("codec", ["columnar-zstd", "columnar-lz4"])
def test_aggregates_keep_metadata_through_codec(codec: str) -> None:
    cfg = parse_aggregation({"rules": [{
        "name": "w10", "match": "*", "window": {"type": "tumbling", "size_s": 600},
        "functions": ["min", "max", "avg", "count"], "lttb": 5, "priority": "low"}]})
    agg = Aggregator(cfg, clock=VirtualClock())
    out = agg.process(_raw(1)) + agg.flush()
    out = [r for r in out]
    back = open_chunk(seal_chunk(out, codec))
    key = sorted((r.sensor, r.ts_ms, r.agg.fn if r.agg else "", r.value,
                  r.agg, r.quality) for r in out)
    key_back = sorted((r.sensor, r.ts_ms, r.agg.fn if r.agg else "", r.value,
                       r.agg, r.quality) for r in back)
    assert key == key_back
    assert all(r.agg is not None for r in back)


def test_degrader_keeps_device_priority_and_unique_seqs_from_the_chunk() -> None:
    raw = [msgspec.structs.replace(r, seq=1000 + i) for i, r in enumerate(_raw(2))]
    degrade = make_degrader(COARSE)
    out = degrade(raw)
    assert 0 < len(out) < len(raw)
    assert {r.device_id for r in out} == {"dev1"} and {r.priority for r in out} == {Priority.LOW}
    seqs = [r.seq for r in out]
    assert seqs == list(range(1000, 1000 + len(out)))
    assert {r.agg.fn for r in out if r.agg} >= {"sum", "count"}
    # not worth it: two readings would become 9 aggregates
    assert degrade(raw[:2]) == []
    assert degrade([]) == []
