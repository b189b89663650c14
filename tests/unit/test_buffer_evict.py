"""Durable buffer: byte budget, priority-aware eviction, retention, degrade, disk full."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.buffer import Retention
from pymigrate.clock import VirtualClock
from pymigrate.errors import BufferFull
from pymigrate.types import Priority, Reading
from tests.unit.buffer_helpers import Events, drain, eventually, opened, readings, within

BUDGET = 312 * 1024  # on disk: database + WAL + sidecars + ballast (agent.buffer.footprint)
CH = 100  # readings per chunk in these tests (noisy values: ~0.9 KB per chunk)


async def fill(buf, priority: Priority, chunks: int, device: str = "d", seed: int = 0) -> None:  # type: ignore[no-untyped-def]
    for i in range(chunks):
        await buf.append(readings(CH, device=device, priority=priority, noisy=True,
                                  seed=seed * 1000 + i))


async def test_budget_evicts_low_oldest_first_then_normal_never_critical(tmp_path: Path) -> None:
    ev = Events()
    async with opened(tmp_path / "b.db", events=ev, budget_bytes=BUDGET,
                      chunk_max_readings=CH) as buf:
        await fill(buf, Priority.CRITICAL, 15, device="c")
        await fill(buf, Priority.LOW, 20, device="l", seed=1)
        await fill(buf, Priority.NORMAL, 20, device="n", seed=2)
        assert buf.stats().evicted == {}
        crit = buf.stats().readings_pending["critical"]
        await fill(buf, Priority.NORMAL, 15, device="n", seed=3)  # over budget now
        s = buf.stats()
        assert s.payload_bytes <= BUDGET
        assert set(s.evicted) == {"budget:low"}
        assert s.readings_pending["critical"] == crit
        got = await drain(buf, ack=False)
        low = sorted({r.seq for r in got if r.device_id == "l"})
        assert low and low[-1] == 20 * CH and low[0] > 1  # the oldest low went first
        assert len(low) % CH == 0
        # more pressure: low runs out, then the oldest normal goes; critical stays
        await fill(buf, Priority.HIGH, 40, device="h", seed=4)
        s = buf.stats()
        assert s.readings_pending["low"] == 0
        assert s.evicted.get("budget:normal", 0) > 0
        assert "budget:critical" not in s.evicted and "budget:high" not in s.evicted
        assert s.readings_pending["critical"] == crit
    evicted = ev.named("evicted")
    assert evicted and all(e["reason"] == "budget" for e in evicted)
    assert sum(e["chunks"] for e in evicted) == sum(s.evicted.values())
    assert sum(e["readings"] for e in evicted) == s.evicted_readings


async def test_critical_evicted_only_by_newer_critical(tmp_path: Path) -> None:
    async with opened(tmp_path / "b.db", budget_bytes=BUDGET, chunk_max_readings=CH) as buf:
        await fill(buf, Priority.CRITICAL, 80, device="c")  # over budget with critical only
        s = buf.stats()
        assert s.evicted.get("budget:critical", 0) > 0 and s.payload_bytes <= BUDGET
        kept = s.readings_pending["critical"]
        evicted_crit = s.evicted["budget:critical"]
        # low data arriving now cannot push critical out: the low data is what goes
        for i in range(40):  # (eviction is by pages: a few chunks may fit in freed ones)
            await fill(buf, Priority.LOW, 1, device="l", seed=9 + i)
            s = buf.stats()
            assert s.readings_pending["critical"] == kept
            assert s.evicted["budget:critical"] == evicted_crit
            if s.evicted.get("budget:low", 0):
                break
        assert s.evicted.get("budget:low", 0) >= 1
        got = await drain(buf, ack=False)
        crit = sorted(r.seq for r in got if r.device_id == "c")
        assert crit[-1] == 80 * CH and crit[0] > 1  # oldest critical went, newest kept
        assert crit == list(range(crit[0], crit[-1] + 1))


async def test_retention_per_priority_on_timer(tmp_path: Path) -> None:
    clock = VirtualClock()
    ev = Events()
    async with opened(tmp_path / "b.db", clock=clock, events=ev, chunk_max_readings=10,
                      retention_s=Retention(low=60, normal=600)) as buf:
        await buf.append(readings(10, priority=Priority.LOW))
        await buf.append(readings(10, priority=Priority.NORMAL))
        await buf.append(readings(10, priority=Priority.CRITICAL))
        await clock.advance(59)
        assert buf.stats().evicted == {}
        await clock.advance(2)  # the timer fires on its own: no take() needed
        await eventually(lambda: buf.stats().evicted == {"retention:low": 1})
        assert buf.stats().readings_pending["low"] == 0
        await clock.advance(600)
        await eventually(lambda: buf.stats().evicted == {"retention:low": 1,
                                                          "retention:normal": 1})
        await clock.advance(86_400 * 30)
        assert buf.stats().readings_pending["critical"] == 10  # kept forever
    assert [e["reason"] for e in ev.named("evicted")] == ["retention", "retention"]


async def test_retention_enforced_on_take(tmp_path: Path) -> None:
    clock = VirtualClock()
    async with opened(tmp_path / "b.db", clock=clock, chunk_max_readings=10,
                      retention_s=Retention(high=10)) as buf:
        await buf.append(readings(10, priority=Priority.HIGH))
        await buf.append(readings(10, priority=Priority.NORMAL))
        buf._tasks[1].cancel()  # no timer: take() alone must enforce the TTL
        await asyncio.gather(buf._tasks[1], return_exceptions=True)
        clock._now += 11
        got = await buf.take(1 << 20)
        assert [c.chunk.priority for c in got] == [Priority.NORMAL]
        assert buf.stats().evicted == {"retention:high": 1}


def _first_per_sensor(rs: list[Reading]) -> list[Reading]:
    seen: dict[str, Reading] = {}
    for r in rs:
        seen.setdefault(r.sensor, r)
    return list(seen.values())


async def _low_kept(path: Path, degrade: bool) -> tuple[int, int, int]:
    async with opened(path, budget_bytes=BUDGET, chunk_max_readings=CH,
                      degrade_low_priority=degrade, degrader=_first_per_sensor) as buf:
        await fill(buf, Priority.LOW, 60, device="l")
        await fill(buf, Priority.NORMAL, 30, device="n", seed=1)
        s = buf.stats()
        assert s.payload_bytes <= BUDGET
        got = await drain(buf, ack=False)
        low_seqs = {r.seq for r in got if r.device_id == "l"}
        return s.degraded, len(low_seqs), min(low_seqs)


async def test_degrade_low_before_drop(tmp_path: Path) -> None:
    degraded, _kept, oldest = await _low_kept(tmp_path / "a.db", True)
    plain_degraded, _plain_kept, plain_oldest = await _low_kept(tmp_path / "b.db", False)
    assert plain_degraded == 0 and degraded > 0
    # compacted chunks keep one reading per sensor, so older low data survives longer
    assert oldest < plain_oldest


async def test_disk_full_evicts_then_raises_without_losing_accepted(tmp_path: Path) -> None:
    ev = Events()
    async with opened(tmp_path / "b.db", events=ev, chunk_max_readings=CH) as buf:
        await fill(buf, Priority.LOW, 10, device="l")
        await fill(buf, Priority.CRITICAL, 10, device="c", seed=1)
        await buf.flush()
        assert buf._db is not None
        pages = next(iter(await buf._db.execute_fetchall("PRAGMA page_count")))[0]
        await buf._db.execute(f"PRAGMA max_page_count = {pages}")
        await fill(buf, Priority.NORMAL, 8, device="n", seed=2)  # fits only by evicting low
        s = buf.stats()
        assert s.evicted.get("disk_full:low", 0) > 0
        assert "disk_full:critical" not in s.evicted
        assert s.readings_pending["normal"] == 8 * CH
        assert any(e["reason"] == "disk_full" for e in ev.named("evicted"))
        # low data can only push out low data: none is left, so a big low batch is refused
        with pytest.raises(BufferFull) as ei:
            await buf.append(readings(40 * CH, device="l2", priority=Priority.LOW, noisy=True))
        assert ei.value.reason == "disk_full"
        s = buf.stats()
        assert s.readings_pending["critical"] == 10 * CH
        assert s.readings_pending["low"] == 0
        small = await buf.append(readings(10, device="l2", priority=Priority.LOW))
        assert [r.seq for r in small] == list(range(1, 11))  # refused ones took no numbers
        await buf._db.execute("PRAGMA max_page_count = 1000000")
        got = await within(drain(buf, ack=False))
        crit = sorted(r.seq for r in got if r.device_id == "c")
        assert crit == list(range(1, 10 * CH + 1))  # nothing accepted was lost
        assert sorted(r.seq for r in got if r.device_id == "n") == list(range(1, 8 * CH + 1))
        assert sorted(r.seq for r in got if r.device_id == "l2") == list(range(1, 11))


async def test_failing_degrader_means_plain_eviction(tmp_path: Path) -> None:
    def broken(rs: list[Reading]) -> list[Reading]:
        raise KeyError("bug")

    async with opened(tmp_path / "b.db", budget_bytes=BUDGET, chunk_max_readings=CH,
                      degrade_low_priority=True, degrader=broken) as buf:
        await fill(buf, Priority.LOW, 90, device="l")
        s = buf.stats()
        assert s.degraded == 0 and s.evicted.get("budget:low", 0) > 0
        assert s.payload_bytes <= BUDGET


def test_disk_full_recognised_from_sqlite_and_os_errors() -> None:
    import errno
    import sqlite3

    from agent.buffer.durable import _is_disk_full

    assert _is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert not _is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert _is_disk_full(sqlite3.OperationalError("database or disk is full"))
    assert not _is_disk_full(sqlite3.OperationalError("database is locked"))


async def test_in_flight_chunks_are_evicted_last_within_their_priority(tmp_path: Path) -> None:
    async with opened(tmp_path / "b.db", budget_bytes=BUDGET, chunk_max_readings=CH) as buf:
        await fill(buf, Priority.LOW, 20, device="l", seed=1)
        taken = await buf.take(max_bytes=1, max_chunks=1)  # the oldest LOW chunk, in flight
        await fill(buf, Priority.NORMAL, 35, device="n", seed=2)
        assert taken and taken[0].chunk.priority == Priority.LOW
        oldest = taken[0].chunk.seq_first
        for i in range(40):  # until over budget
            await fill(buf, Priority.NORMAL, 1, device="n", seed=30 + i)
            if buf.stats().evicted.get("budget:low", 0):
                break
        assert buf.stats().evicted.get("budget:low", 0) > 0
        await buf.ack([taken[0].id])  # delivered: it was not evicted under the uploader
        got = await drain(buf, ack=False)
        low = sorted({r.seq for r in got if r.device_id == "l"})
        assert oldest not in low  # acked, gone
        assert low and low[0] > oldest + CH  # the next-oldest LOW chunks were evicted
