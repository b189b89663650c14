"""SQLite store: the store contract, plus what only SQLite shows (file shared by two
store instances, idempotency table, plan_write edge cases)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest

from cloud.dedup import IdempotencyState
from cloud.stores.base import (
    Admission,
    StoreRejected,
    StoreUnavailable,
    plan_write,
    require_finite,
    seq_runs,
    validate,
)
from cloud.stores.sqlite import SqliteStore
from pymigrate.types import AggInfo, Reading
from tests.unit import cloud_contract as contract
from tests.unit.cloud_helpers import make_readings


def factory(path: Path) -> contract.StoreFactory:
    async def make() -> SqliteStore:
        s = SqliteStore(path)
        await s.open()
        return s
    return make


async def test_resend_written_once_across_restart(tmp_path: Path) -> None:
    await contract.check_resend_written_once(factory(tmp_path / "c.db"), "dev-a")


async def test_overlap_and_out_of_order(tmp_path: Path) -> None:
    await contract.check_overlap_and_out_of_order(factory(tmp_path / "c.db"), "dev-b")


async def test_two_replicas_on_one_file_race(tmp_path: Path) -> None:
    await contract.check_replicas_race(factory(tmp_path / "c.db"), "race-")


async def test_malformed_dead_lettered(tmp_path: Path) -> None:
    await contract.check_malformed_dead_lettered(factory(tmp_path / "c.db"), "dev-m")


async def test_wal_and_tables(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "c.db")
    await s.open()
    try:
        async with s.db.execute("PRAGMA journal_mode") as cur:
            assert (await cur.fetchone())[0] == "wal"  # type: ignore[index]
        async with s.db.execute("SELECT name FROM sqlite_master WHERE type='table'") as cur:
            names = {r[0] async for r in cur}
        assert {"readings", "idempotency", "dead_letters"} <= names
        agg = Reading("d", "t", 5000, 2.5, seq=1, raw_ts_ms=4990, quality=16,
                      agg=AggInfo("w", "avg", 5000, 60))
        await s.write("d", "b", [agg])
        assert await s.query("d") == [agg]
        assert await s.query("d", "t", 5000, 5001) == [agg]
        assert await s.query("d", "t", 5001) == []
        assert await s.query("d", "other") == []
        assert await s.count() == 1 and await s.dead_letter_count() == 0
    finally:
        await s.close()
    with pytest.raises(RuntimeError):
        _ = s.db


async def test_busy_file_is_an_outage(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "c.db", busy_timeout_ms=50)
    other = SqliteStore(tmp_path / "c.db")
    await s.open()
    await other.open()
    try:
        await other.db.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        with pytest.raises(StoreUnavailable):
            await s.write("d", "b", make_readings("d", 3))
        await other.db.execute("ROLLBACK")
        assert (await s.write("d", "b", make_readings("d", 3))).written == 3
    finally:
        await s.close()
        await other.close()


async def test_admit_skip_and_delete(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "c.db")
    await s.open()
    try:
        await s.write("gw1", "b", make_readings("gw1", 2))
        rs = make_readings("gw2", 3)

        def admit(fresh: list[Reading]) -> Admission:
            assert [r.seq for r in fresh] == [1, 2, 3]
            return Admission(write=[fresh[0]], skip=fresh[1:], delete=[("gw1", "", 1)])

        res = await s.write("gw2", "b", rs, admit=admit)
        assert (res.written, res.gateway_dropped, res.replaced, res.duplicates) == (1, 2, 1, 0)
        assert [r.seq for r in await s.query("gw1")] == [2]
        assert (await s.idempotency_state("gw2")).watermark == 3  # skipped seqs are acked
        again = await s.write("gw2", "b", rs, admit=admit)
        assert again.duplicates == 3 and again.written == 0
    finally:
        await s.close()


def test_plan_write_paths() -> None:
    st = IdempotencyState()
    rs = make_readings("d", 5)
    plan = plan_write(st, rs)
    assert len(plan.write) == 5 and st.watermark == 5 and plan.state is st
    plan = plan_write(st, rs)
    assert plan.write == [] and plan.duplicates == 5 and plan.state is None
    # repeated seq in one batch, unordered, with a gap: slow path
    mixed = [rs[0], *make_readings("d", 2, seq0=9), make_readings("d", 1, seq0=7)[0],
             make_readings("d", 1, seq0=9)[0]]
    plan = plan_write(st, mixed)
    assert sorted(r.seq for r in plan.write) == [7, 9, 10] and plan.duplicates == 2
    assert st.watermark == 5 and st.ranges() == [(7, 7), (9, 10)]
    # count == span but a seq repeated: must not take the fast path
    st2 = IdempotencyState()
    a, b = make_readings("d", 2, seq0=1)
    plan = plan_write(st2, [a, a, msgspec.structs.replace(b, seq=3)])
    assert sorted(r.seq for r in plan.write) == [1, 3] and st2.ranges() == [(3, 3)]
    assert plan_write(st2, []).write == []
    assert seq_runs([5, 1, 2, 3, 7, 8]) == [(1, 3), (5, 5), (7, 8)] and seq_runs([]) == []


@pytest.mark.parametrize(("mutate", "reason"), [
    ({"seq": 0}, "bad_seq"), ({"seq": -4}, "bad_seq"), ({"sensor": ""}, "bad_sensor"),
    ({"sensor": "x" * 300}, "bad_sensor"), ({"device_id": "other"}, "device_mismatch"),
    ({"ts_ms": 2**63}, "bad_timestamp"),
])
def test_validate_reasons(mutate: dict[str, object], reason: str) -> None:
    r = msgspec.structs.replace(make_readings("d", 1)[0], **mutate)
    with pytest.raises(StoreRejected) as ei:
        validate("d", [r])
    assert ei.value.reason == reason and not ei.value.retriable


def test_validate_device_and_finite() -> None:
    with pytest.raises(StoreRejected, match="device"):
        validate("", [])
    validate("d", make_readings("d", 2))
    with pytest.raises(StoreRejected) as ei:
        require_finite([Reading("d", "s", 1, float("inf"), seq=1)])
    assert ei.value.reason == "non_finite_value"
    assert StoreUnavailable("x").retriable


async def test_concurrent_writes_one_instance(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "c.db")
    await s.open()
    try:
        results = await asyncio.gather(*(s.write("d", "b", make_readings("d", 50, seq0=1 + 25 * k))
                                         for k in range(6)))
        assert sum(r.written for r in results) == 175 == await s.count("d")
    finally:
        await s.close()


async def test_sqlite_errors_mid_transaction(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "c.db")
    await s.open()
    try:
        # a constraint the database enforces (here a trigger) refuses the data
        await s.db.execute("CREATE TRIGGER no_neg BEFORE INSERT ON readings WHEN NEW.value < 0"
                           " BEGIN SELECT RAISE(ABORT, 'negative value'); END")
        bad = [msgspec.structs.replace(r, value=-1.0) for r in make_readings("d", 3)]
        with pytest.raises(StoreRejected) as ei:
            await s.write("d", "b", bad)
        assert ei.value.reason == "constraint"
        assert await s.count("d") == 0 and (await s.idempotency_state("d")).watermark == 0
        # a broken database (table gone) is an outage, and the transaction is rolled back
        await s.db.execute("DROP TABLE idempotency")
        with pytest.raises(StoreUnavailable):
            await s.write("d", "b", make_readings("d", 3))
        assert not s.db.in_transaction
    finally:
        await s.close()


async def test_completeness_ledger(tmp_path: Path) -> None:
    await contract.check_completeness_ledger(factory(tmp_path / "c.db"), "dev-l")
