"""Edge aggregates, after the codec and the wire envelope, against the statistics the cloud
computes from the raw readings stored in the cloud store."""

from __future__ import annotations

import math
import random
import statistics
from collections import defaultdict
from pathlib import Path

import msgspec
import pytest

from agent.aggregate import Aggregator, parse_aggregation
from agent.codec import open_chunk, seal_chunk
from pymigrate.clock import VirtualClock
from pymigrate.envelope import Batch, decode_batch, encode_batch
from pymigrate.types import Reading

sqlite_store = pytest.importorskip("cloud.stores.sqlite")

T0 = 1_767_225_600_000
WIN = 600_000


def _wire(readings: list[Reading]) -> list[Reading]:
    """Sequence, seal, envelope, decode: what the cloud ingest would hand the store."""
    seqd = [msgspec.structs.replace(r, seq=i + 1) for i, r in enumerate(readings)]
    chunks = [seal_chunk(seqd[i:i + 500]) for i in range(0, len(seqd), 500)]
    batch = decode_batch(encode_batch(Batch(readings[0].device_id, "b1", chunks)))
    return [r for c in batch.chunks for r in open_chunk(c)]


async def test_aggregates_match_statistics_computed_from_raw_in_the_store(
        tmp_path: Path) -> None:
    rng = random.Random(12)
    raw: list[Reading] = []
    for i in range(2 * 3600):  # 2 h at 1 Hz, two sensors, a few gaps
        for sensor, base, noise in (("air_temp_c", -7.6, 0.3), ("pressure_mb", 773.5, 0.05)):
            if rng.random() < 0.03:
                continue
            raw.append(Reading("st-raw", sensor, T0 + 1000 * i, round(base + rng.gauss(0, noise),
                                                                       2)))
    fns = ["min", "max", "sum", "count", "avg", "stddev"]
    agg = Aggregator(parse_aggregation({"rules": [{
        "name": "w10m", "match": "*", "window": {"type": "tumbling", "size_s": 600},
        "functions": fns}]}), clock=VirtualClock(start_ms=T0))
    edge = agg.process(raw) + agg.advance(T0 + 3 * 3_600_000)
    edge = [msgspec.structs.replace(r, device_id="st-agg") for r in edge]

    store = sqlite_store.SqliteStore(tmp_path / "cloud.db")
    await store.open()
    try:
        await store.write("st-raw", "b1", _wire(raw))
        await store.write("st-agg", "b2", _wire(edge))
        stored_aggs = await store.query("st-agg")
        # statistics the cloud computes from the raw rows it stores
        sql = ("SELECT sensor, (ts_ms / ?) * ? AS w, MIN(value), MAX(value), COUNT(*), AVG(value)"
               " FROM readings WHERE device_id = 'st-raw' AND agg_fn IS NULL GROUP BY sensor, w")
        async with store.db.execute(sql, (WIN, WIN)) as cur:
            cloud = {(row[0], row[1]): row[2:] for row in await cur.fetchall()}
        raw_rows = await store.query("st-raw")
    finally:
        await store.close()

    values: dict[tuple[str, int], list[float]] = defaultdict(list)
    for r in raw_rows:
        values[(r.sensor, r.ts_ms - r.ts_ms % WIN)].append(r.value)
    got = {(r.sensor, r.ts_ms, r.agg.fn): r for r in stored_aggs if r.agg is not None}
    assert len(got) == len(fns) * len(cloud) == len(stored_aggs)
    for (sensor, start), (mn, mx, cnt, avg) in cloud.items():
        vals = values[(sensor, start)]
        assert got[(sensor, start, "min")].value == mn
        assert got[(sensor, start, "max")].value == mx
        assert got[(sensor, start, "count")].value == cnt
        assert got[(sensor, start, "sum")].value == math.fsum(vals)
        assert math.isclose(got[(sensor, start, "avg")].value, avg, rel_tol=1e-9)
        assert math.isclose(got[(sensor, start, "stddev")].value, statistics.stdev(vals),
                            rel_tol=1e-9)
        info = got[(sensor, start, "count")].agg
        assert info is not None
        assert (info.rule, info.window_end_ms, info.count) == ("w10m", start + WIN, cnt)
