"""Edge aggregates on the real recordings (tests/data) against statistics of the raw data."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path

import pytest

from agent.aggregate import Aggregator, parse_aggregation
from bench.aggregation import load_csv
from pymigrate.clock import VirtualClock
from pymigrate.types import Reading

DATA = Path(__file__).resolve().parents[1] / "data"
FILES = ["midc_2018-10-18_1min.csv", "surfrad_alamosa_2016-01-01_1min.csv", "cycling_1hz.csv"]
FNS = ["min", "max", "sum", "count", "avg", "stddev", "first", "last"]


def _load(name: str) -> list[Reading]:
    path = DATA / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    return load_csv(path)[2]


@pytest.mark.parametrize("name", FILES)
def test_real_recordings_aggregate_exactly(name: str) -> None:
    readings = _load(name)
    agg = Aggregator(parse_aggregation({"rules": [{
        "name": "w10m", "match": "*", "window": {"type": "tumbling", "size_s": 600},
        "functions": FNS}]}), clock=VirtualClock())
    out: list[Reading] = []
    for i in range(0, len(readings), 256):
        out += agg.process(readings[i:i + 256])
    out += agg.flush()
    groups: dict[tuple[str, int], list[Reading]] = defaultdict(list)
    for r in readings:
        groups[(r.sensor, r.ts_ms - r.ts_ms % 600_000)].append(r)
    got = {(r.sensor, r.ts_ms, r.agg.fn): r.value for r in out if r.agg is not None}
    assert len(got) == len(FNS) * len(groups)
    for (sensor, start), rs in groups.items():
        vals = [r.value for r in rs]
        g = {fn: got[(sensor, start, fn)] for fn in FNS}
        assert (g["min"], g["max"], g["count"]) == (min(vals), max(vals), len(vals))
        assert g["sum"] == math.fsum(vals)
        assert math.isclose(g["avg"], statistics.mean(vals), rel_tol=1e-9)
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        assert math.isclose(g["stddev"], sd, rel_tol=1e-9, abs_tol=1e-300)
        # equal timestamps (duplicates in the recordings): the later arrival is "last"
        assert g["first"] == min(rs, key=lambda r: r.ts_ms).value
        last_ts = max(r.ts_ms for r in rs)
        assert g["last"] == [r for r in rs if r.ts_ms == last_ts][-1].value


def test_real_recording_deadband_bound() -> None:
    readings = _load("cycling_1hz.csv")
    agg = Aggregator(parse_aggregation({"rules": [{
        "name": "db", "match": "*", "window": {"type": "deadband", "abs": 2.0,
                                                "heartbeat_s": 60}}]}), clock=VirtualClock())
    sent = agg.process(readings) + agg.flush()
    held: dict[str, float] = {}
    j = 0
    for r in readings:  # step-hold in arrival order: sent is a subsequence of readings
        if j < len(sent) and sent[j] is r:
            held[r.sensor] = r.value
            j += 1
        assert abs(r.value - held[r.sensor]) <= 2.0
    assert j == len(sent) < len(readings)
