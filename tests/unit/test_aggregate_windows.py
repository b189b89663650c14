"""Window types, event-time lateness, wall-time closing, flush and persisted state."""

from __future__ import annotations

import itertools
import math
import random
import statistics
from collections import defaultdict
from typing import Any

import pytest

from agent.aggregate import (
    PARTIAL_SUFFIX,
    Aggregator,
    SnapshotError,
    is_partial,
    parse_aggregation,
)
from pymigrate.clock import VirtualClock
from pymigrate.types import Priority, Quality, Reading

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z, a multiple of every window size used here
MIN = 60_000


def mk(rules: list[dict[str, Any]], **extra: Any) -> Aggregator:
    return Aggregator(parse_aggregation({"rules": rules, **extra}),
                      clock=VirtualClock(start_ms=T0))


def R(ts: int, v: float, sensor: str = "temp", dev: str = "dev1",
      prio: Priority = Priority.NORMAL) -> Reading:
    return Reading(device_id=dev, sensor=sensor, ts_ms=ts, value=v, priority=prio)


def aggs(out: list[Reading]) -> dict[tuple[str, int, str], Reading]:
    """(sensor, window start, fn) -> aggregate reading."""
    res = {}
    for r in out:
        if r.agg is not None and r.agg.fn != "lttb":
            key = (r.sensor, r.ts_ms, r.agg.fn)
            assert key not in res, f"window emitted twice: {key}"
            res[key] = r
    return res


def raws(out: list[Reading]) -> list[Reading]:
    return [r for r in out if r.agg is None]


def tumbling(size_s: float = 600, fns: list[str] | None = None, **kw: Any) -> dict[str, Any]:
    return {"name": "t", "match": "*", "window": {"type": "tumbling", "size_s": size_s},
            "functions": fns or ["min", "max", "sum", "count", "avg", "stddev", "first",
                                 "last"], **kw}


# ---- tumbling: the statistics the cloud would compute from the raw data -----------------


def test_tumbling_matches_statistics_of_raw_data() -> None:
    rng = random.Random(1)
    readings = []
    for i in range(3 * 3600):  # 3 h at 1 Hz, three sensors, some missing, jittered ts
        for s, base in (("temp", 21.5), ("press", 927.9), ("wind", 0.0)):
            if rng.random() < 0.05:
                continue
            v = base + rng.gauss(0, 0.2 if s != "wind" else 5)
            readings.append(R(T0 + i * 1000 + rng.randint(0, 999), v, s))
    agg = mk([tumbling(600)])
    out = []
    for k in range(0, len(readings), 500):
        out += agg.process(readings[k:k + 500])
    out += agg.flush()
    got = aggs(out)
    groups: dict[tuple[str, int], list[Reading]] = defaultdict(list)
    for r in readings:
        groups[(r.sensor, r.ts_ms - r.ts_ms % 600_000)].append(r)
    assert len(got) == 8 * len(groups)
    for (s, start), rs in groups.items():
        vals = [r.value for r in rs]
        g = {fn: got[(s, start, fn)] for fn in ("min", "max", "sum", "count", "avg", "stddev",
                                                   "first", "last")}
        assert g["min"].value == min(vals)
        assert g["max"].value == max(vals)
        assert g["count"].value == len(vals)
        assert g["sum"].value == math.fsum(vals)
        assert math.isclose(g["avg"].value, statistics.mean(vals), rel_tol=1e-9)
        assert math.isclose(g["stddev"].value, statistics.stdev(vals), rel_tol=1e-9)
        assert g["first"].value == min(rs, key=lambda r: r.ts_ms).value
        assert g["last"].value == max(rs, key=lambda r: r.ts_ms).value
        info = g["sum"].agg
        assert info is not None
        assert (info.rule, info.window_end_ms, info.count) in (
            ("t", start + 600_000, len(vals)), ("t" + PARTIAL_SUFFIX, start + 600_000, len(vals)))
        assert g["sum"].quality == Quality.AGGREGATE
    st = agg.stats()
    assert st.readings_in == len(readings)
    assert st.aggregates_out == len(got)
    assert st.aggregation_ratio == pytest.approx(len(got) / len(readings))
    assert st.aggregation_ratio < 0.05


def test_window_closes_on_event_time_and_emits_once() -> None:
    agg = mk([tumbling(60, ["count"])])
    assert agg.process([R(T0 + 1000, 1.0), R(T0 + 59_999, 2.0)]) == []
    out = agg.process([R(T0 + MIN, 3.0)])  # first reading of the next window closes the first
    assert [(r.ts_ms, r.value) for r in out] == [(T0, 2.0)]
    assert agg.process([R(T0 + MIN + 5, 1.0)]) == []


# ---- lateness ---------------------------------------------------------------------------


def test_late_within_allowed_lateness_is_counted_in_its_window() -> None:
    agg = mk([tumbling(60, ["count", "sum"], allowed_lateness_s=10)])
    out = agg.process([R(T0 + 1000, 1.0), R(T0 + MIN + 5000, 5.0)])
    assert out == []  # watermark = 65 s - 10 s = 55 s < 60 s: first window still open
    out = agg.process([R(T0 + 30_000, 2.0)])  # out of order but within lateness
    assert out == []
    out = agg.process([R(T0 + MIN + 11_000, 6.0)])  # watermark 61 s: window 0 closes
    g = aggs(out)
    assert g[("temp", T0, "count")].value == 2 and g[("temp", T0, "sum")].value == 3.0
    assert agg.stats().late == 0


@pytest.mark.parametrize("policy", ["raw", "drop"])
def test_late_after_allowed_lateness_follows_policy_and_is_counted(policy: str) -> None:
    agg = mk([tumbling(60, ["count"], allowed_lateness_s=10, late_policy=policy)])
    agg.process([R(T0 + 1000, 1.0), R(T0 + MIN + 20_000, 5.0)])  # closes window 0
    out = agg.process([R(T0 + 2000, 7.0)])
    st = agg.stats()
    assert st.late == 1
    if policy == "raw":
        assert len(out) == 1 and out[0].value == 7.0 and out[0].agg is None
        assert out[0].quality & Quality.LATE and st.late_raw == 1
    else:
        assert out == [] and st.late_dropped == 1
    # window 0 was emitted once, without the late reading
    out = agg.flush()
    assert all(r.ts_ms != T0 for r in out)


def test_wall_time_closes_quiet_windows_and_later_readings_are_late() -> None:
    agg = mk([tumbling(60, ["count"], allowed_lateness_s=5)])
    assert agg.next_deadline_ms() is None
    agg.process([R(T0 + 1000, 1.0), R(T0 + 2000, 2.0)])
    assert agg.next_deadline_ms() == T0 + MIN + 5000
    assert agg.advance(T0 + MIN + 4999) == []
    out = agg.advance(T0 + MIN + 5000)
    assert [(r.agg.fn if r.agg else None, r.value) for r in out] == [("count", 2.0)]
    assert agg.next_deadline_ms() is None
    out = agg.process([R(T0 + 3000, 3.0)])
    assert agg.stats().late == 1 and out[0].quality & Quality.LATE


def test_advance_uses_the_injected_clock_and_can_be_disabled() -> None:
    clock = VirtualClock(start_ms=T0 + 10 * MIN)
    agg = Aggregator(parse_aggregation({"rules": [tumbling(60, ["count"])]}), clock=clock)
    agg.process([R(T0, 1.0)])
    assert len(agg.advance()) == 1
    off = mk([tumbling(60, ["count"])], wall_clock_close=False)
    off.process([R(T0, 1.0)])
    assert off.next_deadline_ms() is None and off.advance(T0 + 10 * MIN) == []


# ---- hopping ----------------------------------------------------------------------------


def test_hopping_windows_overlap_and_match_raw() -> None:
    rule = {"name": "h", "match": "*", "window": {"type": "hopping", "size_s": 300, "hop_s": 60},
            "functions": ["count", "sum", "max"]}
    agg = mk([rule])
    rng = random.Random(2)
    readings = [R(T0 + i * 10_000, rng.uniform(-5, 5)) for i in range(360)]  # 1 h every 10 s
    out = agg.process(readings) + agg.flush()
    got = aggs(out)
    starts = sorted({k[1] for k in got})
    assert starts[0] == T0 - 240_000 and starts[1] - starts[0] == 60_000
    for s in starts:
        vals = [r.value for r in readings if s <= r.ts_ms < s + 300_000]
        assert got[("temp", s, "count")].value == len(vals)
        assert got[("temp", s, "sum")].value == math.fsum(vals)
        assert got[("temp", s, "max")].value == max(vals)
    # every reading is in exactly size/hop = 5 windows
    assert sum(got[("temp", s, "count")].value for s in starts) == 5 * len(readings)


def test_hopping_partly_late_reading_goes_to_open_windows_and_is_counted() -> None:
    rule = {"name": "h", "match": "*", "window": {"type": "hopping", "size_s": 120, "hop_s": 60},
            "functions": ["count"]}
    agg = mk([rule])
    agg.process([R(T0 + 10_000, 1.0), R(T0 + 70_000, 1.0)])  # closes [-60 s, 60 s)
    out = agg.process([R(T0 + 30_000, 9.0)])  # in [-60, 60) (closed) and [0, 120) (open)
    assert agg.stats().late == 1 and raws(out)[0].quality & Quality.LATE
    got = aggs(agg.flush())
    assert got[("temp", T0, "count")].value == 3


# ---- count and session ------------------------------------------------------------------


def test_count_windows() -> None:
    agg = mk([{"name": "c", "match": "*", "window": {"type": "count", "count": 4},
               "functions": ["count", "avg", "first", "last"]}])
    out = agg.process([R(T0 + i * 1000, float(i)) for i in range(10)])
    got = aggs(out)
    assert sorted(k[1] for k in got if k[2] == "count") == [T0, T0 + 4000]
    assert got[("temp", T0, "avg")].value == 1.5
    assert got[("temp", T0 + 4000, "last")].value == 7.0
    assert got[("temp", T0 + 4000, "count")].agg.window_end_ms == T0 + 7001  # type: ignore[union-attr]
    rest = agg.flush()
    assert {r.value for r in rest if r.agg and r.agg.fn == "count"} == {2.0}
    assert all(is_partial(r.agg) for r in rest)


def test_session_windows_split_on_gap_and_merge_bridges() -> None:
    agg = mk([{"name": "s", "match": "*", "window": {"type": "session", "gap_s": 30},
               "functions": ["count", "sum"]}])
    burst1 = [R(T0 + i * 5000, 1.0) for i in range(5)]  # 0..20 s
    burst2 = [R(T0 + 100_000 + i * 5000, 2.0) for i in range(3)]  # 100..110 s
    out = agg.process(burst1 + burst2)
    got = aggs(out)
    assert got[("temp", T0, "count")].value == 5
    assert got[("temp", T0, "count")].agg.window_end_ms == T0 + 20_001  # type: ignore[union-attr]
    # two open sessions bridged by one reading become one
    agg2 = mk([{"name": "s", "match": "*", "window": {"type": "session", "gap_s": 30},
                "functions": ["count"]}], wall_clock_close=True)
    agg2.process([R(T0, 1.0), R(T0 + 50_000, 1.0)])  # 50 s apart: first session closes
    agg3 = mk([{"name": "s", "match": "*", "window": {"type": "session", "gap_s": 30},
                "functions": ["count"], "allowed_lateness_s": 60}])
    assert agg3.process([R(T0, 1.0), R(T0 + 50_000, 1.0)]) == []  # both open (lateness)
    assert agg3.process([R(T0 + 25_000, 1.0)]) == []  # bridges them
    assert agg3.next_deadline_ms() == T0 + 50_000 + 30_000 + 60_000
    got3 = aggs(agg3.advance(T0 + 140_000))
    assert got3[("temp", T0, "count")].value == 3
    assert agg2.stats().windows_closed == 1


def test_session_late_reading() -> None:
    agg = mk([{"name": "s", "match": "*", "window": {"type": "session", "gap_s": 10},
               "functions": ["count"], "late_policy": "drop"}])
    agg.process([R(T0, 1.0), R(T0 + 100_000, 1.0)])
    assert agg.process([R(T0 + 5_000, 1.0)]) == []  # its session closed already
    assert agg.stats().late_dropped == 1


# ---- condition windows ------------------------------------------------------------------


def test_deadband_with_heartbeat_and_step_hold_bound() -> None:
    agg = mk([{"name": "db", "match": "*",
               "window": {"type": "deadband", "abs": 0.5, "heartbeat_s": 60}}])
    rng = random.Random(4)
    v, readings = 20.0, []
    for i in range(3600):
        v += rng.gauss(0, 0.05)
        readings.append(R(T0 + i * 1000, v))
    out = agg.process(readings)
    sent = raws(out)
    assert sent[0] == readings[0]
    assert all(r.agg is None for r in out)
    # heartbeat: never more than 60 s between sends while readings flow
    gaps = [b.ts_ms - a.ts_ms for a, b in itertools.pairwise(sent)]
    assert max(gaps) <= 60_000
    # step-hold of what was sent is within the deadband of every raw reading
    j = 0
    for r in readings:
        while j + 1 < len(sent) and sent[j + 1].ts_ms <= r.ts_ms:
            j += 1
        assert abs(r.value - sent[j].value) <= 0.5
    st = agg.stats()
    assert st.suppressed + st.raw_passed == len(readings)
    assert len(sent) < len(readings) / 10


def test_deadband_percent_wall_heartbeat_flush_and_out_of_order() -> None:
    agg = mk([{"name": "db", "match": "*",
               "window": {"type": "deadband", "percent": 10, "heartbeat_s": 30},
               "late_policy": "drop"}])
    out = agg.process([R(T0, 100.0), R(T0 + 1000, 105.0), R(T0 + 2000, 111.0)])
    assert [r.value for r in out] == [100.0, 111.0]  # 105 within 10%, 111 not
    out = agg.process([R(T0 + 3000, 112.0)])
    assert out == [] and agg.next_deadline_ms() == T0 + 2000 + 30_000
    out = agg.advance(T0 + 32_000)  # heartbeat by wall time: the latest unsent value
    assert [(r.ts_ms, r.value) for r in out] == [(T0 + 3000, 112.0)]
    assert agg.next_deadline_ms() is None
    assert agg.process([R(T0 + 500, 1.0)]) == [] and agg.stats().late_dropped == 1
    agg.process([R(T0 + 4000, 113.0)])
    assert [r.value for r in agg.flush()] == [113.0]
    nan = agg.process([R(T0 + 5000, math.nan)])
    assert len(nan) == 1


def test_threshold_passes_excursions_raw_and_aggregates_all() -> None:
    agg = mk([{"name": "boiler", "match": "boiler*",
               "window": {"type": "threshold", "low": 10, "high": 90, "size_s": 60},
               "functions": ["count", "max"], "raw_priority": "critical"}])
    vals = [50, 60, 95, 99, 85, 70, 5, 20, 30]
    rs = [R(T0 + i * 1000, float(v), "boiler_t") for i, v in enumerate(vals)]
    out = agg.process(rs) + agg.flush()
    sent = [r.value for r in raws(out)]
    assert sent == [95, 99, 85, 5, 20]  # excursion plus the first reading back in band
    assert all(r.priority == Priority.CRITICAL for r in raws(out))
    got = aggs(out)
    assert got[("boiler_t", T0, "count")].value == len(vals)
    assert got[("boiler_t", T0, "max")].value == 99


def test_threshold_without_windows_sends_only_excursions() -> None:
    agg = mk([{"name": "alarm", "match": "*", "window": {"type": "threshold", "high": 1}}])
    out = agg.process([R(T0 + i, float(v)) for i, v in enumerate([0, 0, 2, 0, 0])])
    assert [r.value for r in out] == [2.0, 0.0]
    assert agg.stats().suppressed == 3 and agg.next_deadline_ms() is None
    assert agg.advance(T0 + 10 * MIN) == []


def test_threshold_late_reading_is_not_sent_twice() -> None:
    agg = mk([{"name": "b", "match": "*",
               "window": {"type": "threshold", "high": 90, "size_s": 60},
               "functions": ["count"]}])
    agg.process([R(T0, 1.0), R(T0 + 2 * MIN, 1.0)])
    out = agg.process([R(T0 + 1000, 99.0)])  # late for its window, and an excursion
    assert len(out) == 1 and agg.stats().late == 1
    assert agg.next_deadline_ms() == T0 + 3 * MIN
    assert len(agg.advance(T0 + 3 * MIN)) == 1


# ---- routing ----------------------------------------------------------------------------


def test_first_matching_rule_wins_and_unmatched_pass_raw() -> None:
    agg = mk([
        {"name": "alarms", "match": ["alarm_*", "door"], "window": {"type": "raw"},
         "raw_priority": "critical"},
        {"name": "keep", "match": "temp*", "window": {"type": "tumbling", "size_s": 60},
         "functions": ["avg"], "pass_raw": True, "priority": "low"},
        {"name": "all", "match": "t*", "window": {"type": "tumbling", "size_s": 60},
         "functions": ["count"]},
    ])
    assert agg.rule_for("alarm_smoke").name == "alarms"  # type: ignore[union-attr]
    assert agg.rule_for("humidity") is None
    rs = [R(T0, 1.0, "alarm_smoke"), R(T0, 2.0, "temp1"), R(T0, 3.0, "tank"),
          R(T0, 4.0, "humidity"), R(T0, 5.0, "door")]
    out = agg.process(rs)
    assert [(r.sensor, r.priority) for r in out] == [
        ("alarm_smoke", Priority.CRITICAL), ("temp1", Priority.NORMAL),
        ("humidity", Priority.NORMAL), ("door", Priority.CRITICAL)]
    got = aggs(agg.flush())
    assert got[("temp1", T0, "avg")].agg.rule == "keep" + PARTIAL_SUFFIX  # type: ignore[union-attr]
    assert got[("temp1", T0, "avg")].priority == Priority.LOW
    assert got[("tank", T0, "count")].value == 1
    assert agg.stats().unmatched == 1


def test_no_rules_passes_everything_raw() -> None:
    agg = Aggregator(parse_aggregation(None), clock=VirtualClock())
    rs = [R(T0 + i, float(i)) for i in range(5)]
    assert agg.process(rs) == rs
    assert agg.stats().aggregation_ratio == 1.0


def test_series_are_keyed_by_device() -> None:
    agg = mk([tumbling(60, ["count"])])
    agg.process([R(T0, 1.0, dev="a"), R(T0, 1.0, dev="b"), R(T0 + 1, 1.0, dev="b")])
    out = agg.flush()
    assert sorted((r.device_id, r.value) for r in out) == [("a", 1.0), ("b", 2.0)]


def test_lttb_rule_keeps_window_extremes() -> None:
    agg = mk([{"name": "l", "match": "*", "window": {"type": "tumbling", "size_s": 600},
               "functions": ["count"], "lttb": 20}])
    vals = [math.sin(i / 30) for i in range(600)]
    vals[123], vals[400] = 50.0, -50.0
    out = agg.process([R(T0 + i * 1000, v) for i, v in enumerate(vals)])
    out += agg.process([R(T0 + 600_000, 0.0)])
    pts = [r for r in out if r.agg and r.agg.fn == "lttb"]
    assert len(pts) == 20
    kept = {r.ts_ms: r.value for r in pts}
    assert kept[T0] == vals[0] and kept[T0 + 599_000] == vals[599]
    assert kept[T0 + 123_000] == 50.0 and kept[T0 + 400_000] == -50.0
    assert all(r.agg is not None and r.agg.count == 600 for r in pts)


# ---- persistence ------------------------------------------------------------------------


def _run(readings: list[Reading], rules: list[dict[str, Any]], cut: int | None,
         batch: int = 97) -> list[Reading]:
    agg = mk(rules)
    out: list[Reading] = []
    for k in range(0, len(readings), batch):
        if cut is not None and k >= cut:
            blob = agg.snapshot()
            agg = mk(rules)  # a new process: state only from the snapshot
            out += agg.restore(blob)
            cut = None
        out += agg.process(readings[k:k + batch])
    return out + agg.flush()


@pytest.mark.parametrize("rules", [
    [tumbling(600, ["min", "max", "sum", "count", "avg", "stddev", "first", "last", "p90"],
              lttb=10, allowed_lateness_s=30)],
    [{"name": "h", "match": "*", "window": {"type": "hopping", "size_s": 300, "hop_s": 100},
      "functions": ["sum", "count"]}],
    [{"name": "s", "match": "*", "window": {"type": "session", "gap_s": 20},
      "functions": ["sum", "count"], "lttb": 5}],
    [{"name": "c", "match": "*", "window": {"type": "count", "count": 50},
      "functions": ["sum", "stddev"]}],
    [{"name": "d", "match": "*", "window": {"type": "deadband", "abs": 2.5, "heartbeat_s": 900}}],
    [{"name": "th", "match": "*", "window": {"type": "threshold", "high": 1.0, "size_s": 120},
      "functions": ["sum"]}],
])
def test_snapshot_restore_mid_window_equals_uninterrupted_run(rules: list[dict[str, Any]]) -> None:
    rng = random.Random(9)
    readings = []
    t = T0
    for _ in range(2000):
        t += rng.choice([1000, 1000, 2000, 30_000])  # gaps make sessions
        readings.append(R(t + rng.randint(-20_000, 0), rng.gauss(0, 1), rng.choice(["a", "b"])))
    straight = _run(readings, rules, None)
    resumed = _run(readings, rules, cut=1011)
    assert resumed == straight
    assert len(straight) > 20


def test_restore_flushes_state_of_changed_rules_as_partial() -> None:
    old = mk([tumbling(600, ["count"])])
    old.process([R(T0 + i * 1000, 1.0) for i in range(30)])
    blob = old.snapshot()
    new = mk([{**tumbling(300, ["count"]), "name": "t"}])  # same name, different window
    out = new.restore(blob)
    assert [(r.value, r.agg.rule) for r in out] == [(30.0, "t" + PARTIAL_SUFFIX)]  # type: ignore[union-attr]
    assert new.flush() == []


def test_restore_rejects_garbage() -> None:
    agg = mk([tumbling(60, ["count"])])
    with pytest.raises(SnapshotError):
        agg.restore(b"\xc1garbage")
    with pytest.raises(SnapshotError):
        agg.restore(b"\x81\xa1v\x63")  # {"v": 99}
    with pytest.raises(SnapshotError):
        agg.restore(b"\x81\xa1v\x01")  # right version, missing fields


def test_aggregates_inherit_input_quality_flags() -> None:
    agg = mk([tumbling(60, ["count"])])
    out = agg.process([
        R(T0, 1.0),
        Reading("dev1", "temp", T0 + 1, 2.0, quality=int(Quality.TIME_UNCERTAIN | Quality.LATE)),
        R(T0 + MIN, 1.0)])
    assert [r.quality for r in out] == [Quality.AGGREGATE | Quality.TIME_UNCERTAIN]
    agg.process([R(T0 + MIN + 1, 2.0), R(T0 + 2, 3.0, sensor="temp")])  # the 2nd is late
    (clean,) = agg.flush()
    assert clean.quality == Quality.AGGREGATE and clean.value == 2


def test_lttb_buffer_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.aggregate import windows

    monkeypatch.setattr(windows, "LTTB_BUFFER_MAX", 64)
    for rule in ({"name": "l", "match": "*", "window": {"type": "tumbling", "size_s": 3600},
                  "functions": ["count"], "lttb": 10},
                 {"name": "s", "match": "*", "window": {"type": "session", "gap_s": 10},
                  "functions": ["count"], "lttb": 10, "allowed_lateness_s": 1000}):
        agg = mk([rule])
        vals = [math.sin(i / 40) for i in range(1000)]
        vals[555] = 99.0
        rs = [R(T0 + i * 1000, v) for i, v in enumerate(vals)]
        # sessions: two halves bridged by the last reading
        order = rs[:400] + rs[420:] + rs[400:420] if rule["name"] == "s" else rs
        agg.process(order)
        out = agg.flush()
        pts = [r for r in out if r.agg and r.agg.fn == "lttb"]
        assert len(pts) == 10
        kept = {r.ts_ms for r in pts}
        assert {T0, T0 + 555_000, T0 + 999_000} <= kept
        assert aggs(out)[("temp", T0, "count")].value == 1000
