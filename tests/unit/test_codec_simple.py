"""The baseline codecs (ids 1 and 2) keep decoding and keep every field (they group by
series, so the order within a chunk is by series, not acceptance)."""

from __future__ import annotations

import pytest

from agent.codec import open_chunk, seal_chunk
from pymigrate.types import AggInfo, Reading


@pytest.mark.parametrize("name", ["columnar-zstd", "columnar-lz4"])
def test_baseline_roundtrip_keeps_empty_aggregate_apart_from_none(name: str) -> None:
    rs = [Reading("d", "s", 1, 1.0, seq=1, agg=AggInfo("", "", 5, 2)),
          Reading("d", "s", 2, 2.0, seq=2, quality=4, raw_ts_ms=7),
          Reading("d", "t", 3, -0.5, seq=3, uncert_ms=9, agg=AggInfo("r", "max", 9, 3))]
    out = open_chunk(seal_chunk(rs, name))
    assert sorted(out, key=lambda r: r.seq) == rs
