"""Durable buffer: sequence numbers, group commit, sealing, take/ack/release, state."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.codec import open_chunk
from pymigrate.clock import VirtualClock
from pymigrate.types import Priority
from tests.unit.buffer_helpers import crash, drain, opened, readings, within


async def test_seq_consecutive_per_device_and_survive_reopen(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    async with opened(db) as buf:
        a = await buf.append(readings(5, device="a"))
        b = await buf.append(readings(3, device="b") + readings(2, device="a"))
        assert [r.seq for r in a] == [1, 2, 3, 4, 5]
        assert [r.seq for r in b] == [1, 2, 3, 6, 7]
        assert buf.stats().accepted_total == 10
    async with opened(db) as buf:
        c = await buf.append(readings(2, device="a") + readings(1, device="b"))
        assert [r.seq for r in c] == [8, 9, 4]
        got = await drain(buf)
    by_dev: dict[str, list[int]] = {}
    for r in got:
        by_dev.setdefault(r.device_id, []).append(r.seq)
    assert sorted(by_dev["a"]) == list(range(1, 10))
    assert sorted(by_dev["b"]) == [1, 2, 3, 4]


async def test_group_commit_shares_one_transaction(tmp_path: Path) -> None:
    clock = VirtualClock()
    async with opened(tmp_path / "b.db", clock=clock, commit_window_ms=100) as buf:
        before = buf.stats().commits
        tasks = [asyncio.create_task(buf.append(readings(10, seed=i))) for i in range(20)]
        await clock.advance(0.05)
        assert not any(t.done() for t in tasks)  # waiting for the window
        await clock.advance(0.05)
        results = await within(asyncio.gather(*tasks))
        assert buf.stats().commits - before == 1
        seqs = [r.seq for res in results for r in res]
        assert seqs == list(range(1, 201))  # acceptance order = call order


async def test_commit_max_readings_cuts_the_window_short(tmp_path: Path) -> None:
    clock = VirtualClock()
    async with opened(tmp_path / "b.db", clock=clock, commit_window_ms=10_000,
                      commit_max_readings=50) as buf:
        before = buf.stats().commits
        tasks = [asyncio.create_task(buf.append(readings(10, seed=i))) for i in range(10)]
        await within(asyncio.gather(*tasks))  # no virtual time passed at all
        assert buf.stats().commits - before == 2


async def test_seal_by_size_and_staging_is_compact(tmp_path: Path) -> None:
    async with opened(tmp_path / "b.db", chunk_max_readings=100) as buf:
        await buf.append(readings(250))
        s = buf.stats()
        assert s.chunks_pending == 2 and s.open_chunks == 1
        assert s.readings_pending["normal"] == 250
        assert buf._db is not None
        rows = await buf._db.execute_fetchall("SELECT count(*) FROM staging")
        assert next(iter(rows))[0] == 1  # one blob for 50 staged readings, not 50 rows
        await buf.append(readings(30, seed=1))
        rows = await buf._db.execute_fetchall("SELECT count(*) FROM staging")
        assert next(iter(rows))[0] == 2  # one more blob per group commit
        await buf.append(readings(20, seed=2))  # 50 + 30 + 20 = 100: sealed, staging cleared
        rows = await buf._db.execute_fetchall("SELECT count(*) FROM staging")
        assert next(iter(rows))[0] == 0
        assert buf.stats().chunks_pending == 3 and buf.stats().open_chunks == 0


async def test_seal_by_age_on_virtual_time(tmp_path: Path) -> None:
    clock = VirtualClock()
    async with opened(tmp_path / "b.db", clock=clock, chunk_max_age_s=60) as buf:
        await buf.append(readings(10))
        waiter = asyncio.create_task(buf.wait_for_data())
        await clock.advance(59)
        assert buf.stats().chunks_pending == 0 and not waiter.done()
        await clock.advance(1.5)
        await within(waiter)
        assert buf.stats().chunks_pending == 1 and buf.stats().open_chunks == 0
        got = await buf.take(1 << 20)
        assert got[0].chunk.count == 10 and got[0].chunk.seq_first == 1


async def test_take_order_limits_inflight_release_ack(tmp_path: Path) -> None:
    async with opened(tmp_path / "b.db", chunk_max_readings=10) as buf:
        await buf.append(readings(20, priority=Priority.LOW))
        await buf.append(readings(10, priority=Priority.CRITICAL))
        await buf.append(readings(20, priority=Priority.NORMAL))
        one = await buf.take(1)  # byte limit below one chunk: still one chunk
        assert len(one) == 1 and one[0].chunk.priority == Priority.CRITICAL
        rest = await buf.take(1 << 20, max_chunks=3)
        assert [(c.chunk.priority, c.chunk.seq_first) for c in rest] == [
            (Priority.NORMAL, 31), (Priority.NORMAL, 41), (Priority.LOW, 1)]
        assert buf.stats().in_flight == 4
        last = await buf.take(1 << 20)
        assert [(c.chunk.priority, c.chunk.seq_first) for c in last] == [(Priority.LOW, 11)]
        assert await buf.take(1 << 20) == []  # everything in flight
        await buf.release([rest[0].id, rest[0].id, 99999])
        again = await buf.take(1 << 20)
        assert [c.id for c in again] == [rest[0].id] and again[0].attempts == 1
        await buf.ack([c.id for c in one + rest + last])
        s = buf.stats()
        assert s.chunks_pending == 0 and s.in_flight == 0
        assert sum(s.readings_pending.values()) == 0 and s.payload_bytes == 0
        await buf.ack([])
        await buf.release([])


async def test_min_priority_and_wait_for_data(tmp_path: Path) -> None:
    async with opened(tmp_path / "b.db", chunk_max_readings=10) as buf:
        await buf.append(readings(10, priority=Priority.LOW))
        assert await buf.take(1 << 20, min_priority=Priority.HIGH) == []
        waiter = asyncio.create_task(buf.wait_for_data(Priority.HIGH))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        await buf.append(readings(10, priority=Priority.HIGH))
        await within(waiter)
        got = await buf.take(1 << 20, min_priority=Priority.HIGH)
        assert [c.chunk.priority for c in got] == [Priority.HIGH]
        waiter = asyncio.create_task(buf.wait_for_data(Priority.HIGH))
        await asyncio.sleep(0.01)
        assert not waiter.done()  # the only high chunk is in flight
        await buf.release([got[0].id])
        await within(waiter)


async def test_flush_close_and_state(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    async with opened(db) as buf:
        await buf.append(readings(7))
        await buf.put_state("agg", b"window-1")
        assert await buf.get_state("agg") == b"window-1"
        assert await buf.get_state("none") is None
        await buf.flush()
        assert buf.stats().open_chunks == 0 and buf.stats().chunks_pending == 1
        await buf.append(readings(3, seed=4))
    with pytest.raises(RuntimeError):
        await buf.append(readings(1))
    with pytest.raises(RuntimeError):
        await buf.take(10)
    async with opened(db) as buf:
        assert await buf.get_state("agg") == b"window-1"
        got = await drain(buf)
        assert sorted(r.seq for r in got) == list(range(1, 11))
        assert buf.stats().oldest_ts_ms is None


async def test_state_rides_on_group_commit(tmp_path: Path) -> None:
    clock = VirtualClock()
    async with opened(tmp_path / "b.db", clock=clock, commit_window_ms=100) as buf:
        before = buf.stats().commits
        t1 = asyncio.create_task(buf.append(readings(5)))
        t2 = asyncio.create_task(buf.put_state("k", b"v"))
        await clock.advance(0.1)
        await within(asyncio.gather(t1, t2))
        assert buf.stats().commits - before == 1


async def test_crash_keeps_staged_readings(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    async with opened(db, chunk_max_readings=100) as buf:
        await buf.append(readings(130))
        await buf.append(readings(5, device="other"))
        await crash(buf)
    async with opened(db, chunk_max_readings=100) as buf:
        s = buf.stats()
        assert s.readings_pending["normal"] == 135 and s.open_chunks == 0
        nxt = await buf.append(readings(1))
        assert nxt[0].seq == 131
        got = await drain(buf)
        seqs = sorted(r.seq for r in got if r.device_id == "dev-1")
        assert seqs == list(range(1, 132))
        assert sorted(r.seq for r in got if r.device_id == "other") == [1, 2, 3, 4, 5]


async def test_stats_and_events_content(tmp_path: Path) -> None:
    async with opened(tmp_path / "b.db", chunk_max_readings=10) as buf:
        rs = readings(15, priority=Priority.HIGH)
        await buf.append(rs)
        s = buf.stats()
        assert s.oldest_ts_ms == rs[0].ts_ms
        assert s.bytes_on_disk > 0 and s.payload_bytes > 0
        assert s.readings_pending == {"critical": 0, "high": 15, "normal": 0, "low": 0}
        got = await buf.take(1 << 20)
        assert open_chunk(got[0].chunk)[0].value == rs[0].value


async def test_unencodable_reading_fails_only_its_caller(tmp_path: Path) -> None:
    from pymigrate.types import Reading

    clock = VirtualClock()
    async with opened(tmp_path / "b.db", clock=clock, commit_window_ms=100) as buf:
        bad = Reading(device_id="dev-1", sensor="s", ts_ms=1, value="oops")  # type: ignore[arg-type]
        t_good = asyncio.create_task(buf.append(readings(5)))
        t_bad = asyncio.create_task(buf.append([bad]))
        t_state = asyncio.create_task(buf.put_state("k", b"v"))
        await clock.advance(0.1)
        good = await within(t_good)
        with pytest.raises(Exception):  # noqa: B017 - whatever the codec raises reaches the caller
            await within(t_bad)
        await within(t_state)
        assert [r.seq for r in good] == [1, 2, 3, 4, 5]
        nxt = asyncio.create_task(buf.append(readings(1)))
        await clock.advance(0.1)
        assert (await within(nxt))[0].seq == 6  # the refused one took no number
        assert await buf.get_state("k") == b"v"
