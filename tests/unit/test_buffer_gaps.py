"""The device side of the completeness ledger: whatever the buffer gives up leaves a gap
record in the same transaction, gap records survive a crash until acked, a salvage keeps
staging, state and pending gaps, and the stream identity (instance) is stable."""

from __future__ import annotations

from pathlib import Path

from agent.buffer import Retention
from agent.buffer.schema import read_instance_file, salvage
from pymigrate.clock import VirtualClock
from pymigrate.types import Priority
from tests.unit.buffer_helpers import crash, drain, opened, readings

BUDGET = 280 * 1024  # on disk: database + WAL + sidecars + ballast
CH = 100


def _seqs(gaps: list) -> set[int]:  # type: ignore[type-arg]
    out: set[int] = set()
    for g in gaps:
        for a, b in g.gap.runs:
            out.update(range(a, b + 1))
    return out


async def test_every_evicted_sequence_number_is_in_an_exact_gap(tmp_path: Path) -> None:
    async with opened(tmp_path / "b.db", budget_bytes=BUDGET, chunk_max_readings=CH) as buf:
        issued: list[int] = []
        for i in range(150):  # interleave priorities: a chunk's seqs are not contiguous
            for p in (Priority.LOW, Priority.NORMAL):
                got = await buf.append(readings(CH // 2, device="d", priority=p, noisy=True,
                                                seed=i * 2 + int(p)))
                issued.extend(r.seq for r in got)
        s = buf.stats()
        assert s.evicted_readings > 0
        assert s.gap_readings == s.evicted_readings
        gaps = await buf.take_gaps("d", limit=10_000)
        assert {g.gap.reason for g in gaps} == {"evicted"}
        assert all(g.gap.exact and g.gap.detail == "budget" for g in gaps)
        given_up = _seqs(gaps)
        assert len(given_up) == s.evicted_readings
        kept = {r.seq for r in await drain(buf)}
        # reading by reading: every issued seq is kept or in a gap, never both
        assert kept | given_up == set(issued)
        assert not kept & given_up


async def test_gap_records_survive_a_crash_until_the_cloud_acks_them(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    async with opened(path, budget_bytes=BUDGET, chunk_max_readings=CH) as buf:
        for i in range(80):
            await buf.append(readings(CH, device="d", noisy=True, seed=i))
            if i % 8 == 7:  # handed out and given back: the next evictions make a new record
                await buf.release([], gap_ids=[g.id for g in await buf.take_gaps("d")])
        n = buf.stats().gaps_pending
        assert n > 3
        first = await buf.take_gaps("d", limit=2)
        assert len(first) == 2
        assert len(await buf.take_gaps("d", limit=10_000)) == n - 2  # in flight: not again
        await crash(buf)
    async with opened(path, budget_bytes=BUDGET, chunk_max_readings=CH) as buf:
        assert buf.stats().gaps_pending == n  # in flight is not acked: all still there
        rows = await buf.take_gaps(None, limit=3)
        await buf.ack([], [g.id for g in rows])
        assert buf.stats().gaps_pending == n - 3
        rest = await buf.take_gaps("d", limit=10_000)
        await buf.release([], gap_ids=[g.id for g in rest])
        assert len(await buf.take_gaps("d", limit=10_000)) == n - 3


async def test_a_long_outage_folds_gap_records_and_never_changes_one_handed_out(
        tmp_path: Path) -> None:
    """A week offline must not fill the budget with gap records: evictions fold into the
    open record (exact runs kept); a record handed out is never changed afterwards."""
    async with opened(tmp_path / "b.db", budget_bytes=BUDGET, chunk_max_readings=CH) as buf:
        for i in range(40):
            await buf.append(readings(CH, device="d", noisy=True, seed=i))
        s = buf.stats()
        assert s.gaps_recorded > 5 and s.gaps_pending == 1  # every eviction, one row
        first = await buf.take_gaps("d")
        assert len(first) == 1 and first[0].gap.count == s.evicted_readings
        assert first[0].gap.count == sum(b - a + 1 for a, b in first[0].gap.runs)
        before = first[0].gap
        await buf.release([], gap_ids=[first[0].id])
        for i in range(40, 60):
            await buf.append(readings(CH, device="d", noisy=True, seed=i))
        rows = await buf.take_gaps("d", limit=10_000)
        assert len(rows) == 2 and rows[0].gap == before  # the handed-out one as it was
        assert _seqs(rows) == _seqs(first) | _seqs(rows[1:])
        assert sum(g.gap.count for g in rows) == buf.stats().evicted_readings


async def test_retention_and_give_up_leave_gaps(tmp_path: Path) -> None:
    clock = VirtualClock()
    async with opened(tmp_path / "b.db", clock=clock, chunk_max_readings=10,
                      retention_s=Retention(low=60)) as buf:
        await buf.append(readings(10, device="d", priority=Priority.LOW))
        await buf.append(readings(10, device="d", priority=Priority.NORMAL))
        await buf.flush()
        await clock.advance(120)
        taken = await buf.take(1 << 20)
        assert [t.chunk.priority for t in taken] == [Priority.NORMAL]
        assert await buf.give_up([taken[0].id], "oversized") == 10
        gaps = await buf.take_gaps("d")
        assert sorted(g.gap.reason for g in gaps) == ["expired", "oversized"]
        assert _seqs(gaps) == set(range(1, 21))


async def test_instance_id_is_stable_and_survives_a_lost_database(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    async with opened(path) as buf:
        inst = buf.instance
        await buf.append(readings(5, device="d"))
        assert buf.stream_of("d") == (inst, 1, 5)
    assert read_instance_file(path) == inst
    async with opened(path) as buf:
        assert buf.instance == inst
    for name in ("b.db", "b.db-wal", "b.db-shm"):  # wiped, but the instance file kept
        (tmp_path / name).unlink(missing_ok=True)
    async with opened(path) as buf:
        assert buf.instance == inst
        _, base, hwm = buf.stream_of("d")
        assert hwm >= 5 and base == 1
        gaps = await buf.take_gaps("d")
        # numbering continues above the high water; what the lost file held is a gap
        assert [(g.gap.reason, g.gap.exact, g.gap.seq_first) for g in gaps] == [
            ("lost", False, 1)]
        assert gaps[0].gap.seq_last == hwm


async def test_salvage_keeps_staging_state_and_pending_gaps(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    async with opened(path, budget_bytes=BUDGET, chunk_max_readings=CH) as buf:
        for i in range(70):
            await buf.append(readings(CH, device="d", noisy=True, seed=i))
        staged = await buf.append(readings(7, device="d", priority=Priority.CRITICAL),
                                  state=("agg", b"window-state"))
        pending_gaps = buf.stats().gaps_pending
        inst = buf.instance
        assert pending_gaps > 0
        await crash(buf)
    dst = tmp_path / "salvaged.db"
    res = salvage(path, dst, 256, now_ms=1)
    assert res.staged >= 1 and res.unknown == 0
    async with opened(dst, budget_bytes=BUDGET, chunk_max_readings=CH) as buf:
        assert buf.instance == inst  # meta copied: the same stream
        assert await buf.get_state("agg") == b"window-state"
        assert buf.stats().gaps_pending == pending_gaps
        got = {r.seq for r in await drain(buf)}
        assert {r.seq for r in staged} <= got  # accepted, unsealed readings kept


async def test_unreadable_database_becomes_a_corrupt_gap_over_what_it_held(
        tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    async with opened(path, chunk_max_readings=CH) as buf:
        got = await buf.append(readings(250, device="d", priority=Priority.CRITICAL))
        await crash(buf)
    raw = bytearray(path.read_bytes())
    raw[100:4096] = b"\xff" * (4096 - 100)  # wreck the schema page: nothing can be read
    path.write_bytes(bytes(raw))
    async with opened(path, chunk_max_readings=CH) as buf:
        assert buf.stats().moved_aside == 1
        gaps = await buf.take_gaps("d")
        ranged = [g.gap for g in gaps if g.gap.reason == "corrupt"]
        assert ranged and not ranged[0].exact
        # the gap names every accepted reading the unreadable file held
        assert all(ranged[0].seq_first <= r.seq <= ranged[0].seq_last for r in got)
        new = await buf.append(readings(1, device="d"))
        assert new[0].seq > ranged[0].seq_last  # numbering never goes back
