"""Durable buffer with every priority arriving together (as from a real gateway) on
storage that refuses to grow below the byte budget (SQLITE_FULL while the budget and
statvfs still say there is room: a filesystem or container quota, SQLite's
``max_page_count``).

Chunks of all priorities sealed in the same commits used to share the database's pages,
so evicting the lowest priority, even all of it, freed almost no page: the buffer could
not make room by its policy and refused every commit from then on (the storage-exhaustion
scenario held its ingest for good).
"""

from __future__ import annotations

from pathlib import Path

from agent.buffer import DurableBuffer
from agent.codec import open_chunk
from pymigrate.clock import VirtualClock
from pymigrate.types import Priority, Reading
from tests.unit.buffer_helpers import opened, readings, within

CH = 80  # readings per chunk (noisy values: ~0.75 KB per chunk)
# per commit: half a chunk each of high and two normal devices, a low chunk, a tenth of a
# critical one: low data is 40% of what arrives, and shares every page with the rest
MIX = ((Priority.HIGH, "h", CH // 2), (Priority.NORMAL, "n", CH // 2),
       (Priority.NORMAL, "m", CH // 2), (Priority.LOW, "l", CH), (Priority.CRITICAL, "c", CH // 10))


def mixed(i: int) -> list[Reading]:
    out: list[Reading] = []
    for p, dev, n in MIX:
        rs = readings(n, device=dev, priority=p, noisy=True, seed=i * 10 + int(p),
                      start_ms=1_767_225_600_000 + i * 10_000)
        out.extend(rs)
    return out


async def _accounted(buf: DurableBuffer) -> dict[str, tuple[set[int], set[int]]]:
    """Per device: (sequence numbers still stored, sequence numbers in gap records)."""
    await buf.flush()
    out: dict[str, tuple[set[int], set[int]]] = {dev: (set(), set()) for _, dev, _ in MIX}
    while got := await buf.take(1 << 30, max_chunks=256):
        for sc in got:
            for r in open_chunk(sc.chunk):
                out[r.device_id][0].add(r.seq)
    for _, dev, _ in MIX:
        for g in await buf.take_gaps(dev, limit=100_000):
            for a, b in g.gap.runs or [(g.gap.seq_first, g.gap.seq_last)]:
                out[dev][1].update(range(a, b + 1))
    return out


async def test_storage_full_below_budget_evicts_low_and_keeps_accepting(tmp_path: Path) -> None:
    budget = 4 * 1024 * 1024
    async with opened(tmp_path / "b.db", budget_bytes=budget, chunk_max_readings=CH) as buf:
        for i in range(10):
            await buf.append(mixed(i))
        assert buf._db is not None
        pages = next(iter(await buf._db.execute_fetchall("PRAGMA page_count")))[0]
        # the storage lets the file grow by 55 pages more (220 KiB), far below the 4 MiB
        # budget: room for the high, normal and critical data to come, not for the low
        await buf._db.execute(f"PRAGMA max_page_count = {pages + 55}")
        n = 100
        for i in range(10, n):  # every commit is accepted: nothing is held or refused
            await within(buf.append(mixed(i)), 10.0)
        s = buf.stats()
        assert set(s.evicted) == {"disk_full:low"}  # low data only: it keeps arriving
        assert s.effective_budget_bytes < budget // 2  # it learnt what the storage holds
        assert s.disk_full_errors < 10  # ... once: commits do not fail one after another
        assert s.gap_readings == s.evicted_readings > 0
        kept = s.readings_pending
        assert kept["high"] == n * CH // 2 and kept["normal"] == n * CH
        assert kept["critical"] == n * CH // 10
        acc = await _accounted(buf)
    for _, dev, per in MIX:
        stored, gap = acc[dev]
        assert not stored & gap
        assert stored | gap == set(range(1, n * per + 1)), dev  # each number stored or a gap
        if dev != "l":
            assert not gap


async def test_learnt_capacity_is_tried_again_later(tmp_path: Path) -> None:
    budget = 4 * 1024 * 1024
    clock = VirtualClock()
    async with opened(tmp_path / "b.db", clock=clock, budget_bytes=budget,
                      chunk_max_readings=CH) as buf:
        await buf.append(mixed(0))
        assert buf._db is not None
        pages = next(iter(await buf._db.execute_fetchall("PRAGMA page_count")))[0]
        await buf._db.execute(f"PRAGMA max_page_count = {pages + 8}")
        for i in range(1, 30):
            await within(buf.append(mixed(i)), 10.0)
        s = buf.stats()
        assert s.evicted and s.effective_budget_bytes < budget // 4
        await buf._db.execute("PRAGMA max_page_count = 1000000")  # the quota was raised
        await clock.advance(601)  # ... and the buffer tries to grow the file again
        for i in range(30, 40):
            await within(buf.append(mixed(i)), 10.0)
        after = buf.stats()
        assert after.evicted == s.evicted  # room again: nothing more evicted
        assert after.effective_budget_bytes == budget
