"""The chaos audit (bench/_chaos_audit.py) accounts sequence number by sequence number:
a missing reading is "evicted" only where a gap names that very seq, never because an
eviction count is large enough to absorb it."""

from __future__ import annotations

from pathlib import Path

from bench._chaos_audit import (
    GapRec,
    Store,
    StreamTruth,
    Truth,
    audit,
    read_buffer_streams,
)
from tests.unit.buffer_helpers import opened, readings

DEV = "dev-1"


def _truth(n: int) -> Truth:
    t = Truth()
    for i in range(1, n + 1):
        t.add(DEV, "s", float(i), "normal", 1000 * i)
    return t


def _rows(seqs: list[int]) -> list[tuple[str, str, int, str, float, int]]:
    return [(DEV, "inst", s, "s", float(s), 1000 * s) for s in seqs]


def _store(seqs: list[int], gaps: list[GapRec] | None = None) -> Store:
    import collections

    rows = _rows(seqs)
    return Store(rows, {(DEV, "inst"): gaps or []}, {}, len(rows), collections.Counter())


def _ledger(stored: int, unexplained: int, gaps: dict[str, int], max_seq: int) -> dict:  # type: ignore[type-arg]
    s = {"instance": "inst", "max_seq": max_seq, "stored": stored, "unexplained": unexplained,
         "gaps": gaps}
    return {"devices": [{"device_id": DEV, "streams": [s]}], "totals": {"stored": stored}}


STREAM = [StreamTruth(DEV, "inst", 1, 10, "a")]


def test_an_eviction_gap_explains_only_the_seqs_it_names() -> None:
    # seqs 4 and 7 are missing; the only gap names seq 4 (count 2 would have "absorbed"
    # both in a count-based audit)
    store = _store([1, 2, 3, 5, 6, 8, 9, 10], [GapRec(4, 4, "evicted", [(4, 4)])])
    res = audit(_truth(10), STREAM, store, _ledger(8, 1, {"evicted": 1}, 10))
    assert res["gaps_by_reason"] == {"evicted": 1}
    assert res["unexplained"] == 1
    assert res["per_stream"][0]["unexplained_runs"] == [(7, 7)]
    assert res["ledger"]["agrees"] is True


def test_a_range_only_gap_explains_what_nothing_exact_does() -> None:
    store = _store([1, 2, 9, 10], [GapRec(3, 5, "evicted", [(3, 5)]),
                                   GapRec(3, 8, "corrupt", [])])
    res = audit(_truth(10), STREAM, store, None)
    assert res["gaps_by_reason"] == {"evicted": 3, "corrupt": 3}
    assert res["unexplained"] == 0
    assert res["ledger"]["agrees"] is False  # no ledger report: nothing to agree with


def test_duplicates_unknown_content_and_disagreeing_ledger_are_reported() -> None:
    store = _store([*range(1, 11), 3])
    store.rows.append((DEV, "inst", 11, "s", 99.5, 0))  # beyond the hwm, not produced
    store.count_star = len(store.rows)
    res = audit(_truth(10), STREAM, store, _ledger(10, 0, {}, 10))
    assert res["duplicates"] == 1
    assert res["beyond_hwm"] == 1
    assert res["unknown_in_store"] == 1
    assert res["ledger"]["agrees"] is False  # COUNT(*) = 12 rows, the ledger says 10


def test_the_harness_hwm_catches_what_the_cloud_was_never_told() -> None:
    # the cloud heard of seqs up to 8 only; the agent numbered 10: 9 and 10 are missing
    store = _store(list(range(1, 9)))
    res = audit(_truth(10), STREAM, store, _ledger(8, 0, {}, 8))
    assert res["unexplained"] == 2
    assert res["ledger"]["agrees"] is False
    assert res["never_numbered"] == 0 and res["produced_not_stored"] == 2


def test_seqs_still_on_the_device_are_not_called_lost() -> None:
    st = [StreamTruth(DEV, "inst", 1, 10, "a", ((9, 10),))]
    res = audit(_truth(10), st, _store(list(range(1, 9))), _ledger(8, 2, {}, 10))
    assert res["unexplained"] == 0 and res["still_buffered"] == 2
    assert res["ledger"]["agrees"] is True


async def test_read_buffer_streams_matches_the_buffer(tmp_path: Path) -> None:
    db = tmp_path / "buffer.db"
    async with opened(db) as buf:
        await buf.append(readings(25, device=DEV))
        await buf.flush()
        want = buf.stream_of(DEV)
    got = read_buffer_streams(db, "a")
    assert [(s.device_id, s.instance, s.seq_base, s.hwm) for s in got] == [(DEV, *want)]
    assert want[2] == 25
    assert got[0].buffered == ((1, 25),)  # nothing was uploaded: all still on the device
