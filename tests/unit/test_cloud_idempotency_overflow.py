"""Interleaved priorities open one gap per reading; when the idempotency state overflows
its range bound, nothing still unsent may be acked as a duplicate (regression: the state
used to close the lowest gaps, losing the readings that later arrived in them)."""

from __future__ import annotations

from pathlib import Path

from cloud.stores import SqliteStore
from pymigrate.types import Priority, Reading


def _r(seq: int) -> Reading:
    return Reading("dev", "s", 1_767_225_600_000 + seq, float(seq), Priority.NORMAL, seq)


async def test_overflowing_state_loses_nothing_and_stores_once(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "c.db")
    await store.open()
    try:
        evens = [_r(s) for s in range(2, 10_001, 2)]  # 5,000 gaps > the 4,096 bound
        res = await store.write("dev", "b-even", evens)
        assert res.written == 5_000
        again = await store.write("dev", "b-even-resend", evens[:10])  # forgotten ranges
        assert again.written == 0 and again.duplicates == 10
        odds = [_r(s) for s in range(1, 10_000, 2)]  # the backlog arrives late
        res = await store.write("dev", "b-odd", odds)
        assert res.written == 5_000 and res.duplicates == 0
        assert await store.count("dev") == 10_000
        seqs = [r.seq for r in await store.query("dev")]
        assert sorted(seqs) == list(range(1, 10_001))
    finally:
        await store.close()
