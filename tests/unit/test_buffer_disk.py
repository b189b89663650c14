"""Durable buffer on a real, size-limited filesystem (a tmpfs mounted by the test), and
retention on the buffer's own clock.

The tmpfs tests need root (``mount``), as CI runs; elsewhere they skip with the reason.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.buffer import Retention, footprint
from pymigrate.clock import VirtualClock
from pymigrate.errors import BufferFull
from pymigrate.types import Priority
from tests.unit.buffer_helpers import drain, opened, readings

KIB = 1024


def _header(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(100)[40:72]  # schema cookie, format, cache size, user_version ...


def _exists(path: Path) -> bool:
    return path.exists()


def _dir_bytes(path: Path) -> int:
    return sum(os.stat(p).st_blocks * 512 for p in path.iterdir() if p.is_file())


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A 1 MiB tmpfs at ``tmp_path / 'fs'`` (yields (path, size)), unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    size = 1024 * KIB
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt, size
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(path: Path) -> int:
    """Another writer takes every byte left on the filesystem."""
    n = 0
    with open(path, "wb", buffering=0) as f:
        for block in (64 * KIB, 4 * KIB, 1):
            with contextlib.suppress(OSError):
                while True:
                    n += f.write(b"x" * block)
    return n


async def _append_until_evicted(buf, peak: list[int], root: Path, rounds: int) -> None:  # type: ignore[no-untyped-def]
    for i in range(rounds):
        await buf.append(readings(200, device="d", priority=Priority.LOW, noisy=True, seed=i))
        peak[0] = max(peak[0], _dir_bytes(root))


async def test_budget_bounds_every_file_the_buffer_keeps(tmpfs: tuple[Path, int]) -> None:
    mnt, _ = tmpfs
    budget = 400 * KIB
    peak = [0]
    async with opened(mnt / "b.db", budget_bytes=budget, chunk_max_readings=200) as buf:
        await _append_until_evicted(buf, peak, mnt, 220)  # ~2.5x the budget of payload
        s = buf.stats()
        assert s.evicted.get("budget:low", 0) > 0  # eviction happened and is counted
        assert s.evicted_readings > 0 and s.gap_readings == s.evicted_readings  # ledger
        assert s.disk_full_errors == 0 and not s.disk_full  # never hit the disk's limit
        assert s.state_bytes <= budget
    # database + WAL + sidecars + ballast, as allocated on disk: within budget + 64 KiB
    assert 0.7 * budget < peak[0] <= budget + 64 * KIB


async def test_another_process_fills_the_disk_then_space_returns(
        tmpfs: tuple[Path, int]) -> None:
    mnt, _ = tmpfs
    async with opened(mnt / "b.db", budget_bytes=4 * 1024 * KIB,  # budget > the disk
                      chunk_max_readings=200) as buf:
        for i in range(20):
            await buf.append(readings(200, device="d", priority=Priority.LOW, noisy=True,
                                      seed=i))
        filler = mnt / "filler"
        _fill(filler)
        failures = 0
        for i in range(20, 60):  # the buffer evicts old LOW data to keep going, or refuses
            try:
                await buf.append(readings(200, device="d", priority=Priority.LOW,
                                          noisy=True, seed=i))
            except BufferFull as exc:
                assert exc.reason == "disk_full"
                failures += 1
        s = buf.stats()
        assert s.disk_full  # /health reports it (agent.metrics.health)
        assert s.evicted.get("disk_full:low", 0) > 0 or failures > 0
        assert s.gap_readings == s.evicted_readings
        # the uploader side keeps working on the full disk: take + ack free space
        got = await buf.take(1 << 20, max_chunks=8)
        assert got
        await buf.ack([c.id for c in got])
        filler.unlink()  # space returns
        await buf.append(readings(200, device="d", priority=Priority.HIGH, seed=99))
        s = buf.stats()
        assert not s.disk_full


async def test_restart_on_a_full_disk_opens_and_uploads(tmpfs: tuple[Path, int]) -> None:
    mnt, _ = tmpfs
    path = mnt / "b.db"
    async with opened(path, budget_bytes=512 * KIB, chunk_max_readings=200) as buf:
        for i in range(10):
            await buf.append(readings(200, device="d", priority=Priority.NORMAL, noisy=True,
                                      seed=i))
        await buf.append(readings(50, device="d", priority=Priority.NORMAL, seed=11))
        assert buf.stats().ballast
        seq_hwm = buf.stream_of("d")[2]
    _fill(mnt / "filler")
    assert footprint.disk_free(mnt) == 0
    # reopening must not write its schema; the ballast gives the WAL room for the acks
    async with opened(path, budget_bytes=512 * KIB, chunk_max_readings=200) as buf:
        assert buf.stream_of("d")[2] == seq_hwm
        got = await drain(buf, ack=True)
        assert len(got) == 10 * 200 + 50
        assert [r.seq for r in got] == list(range(1, seq_hwm + 1))
        assert buf.stats().chunks_pending == 0


async def test_schema_is_not_written_when_current(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    async with opened(path) as buf:
        await buf.append(readings(5))
    before = _header(path)
    async with opened(path) as buf:
        assert buf.stats().readings_pending["normal"] == 5
        assert not _exists(Path(f"{path}-shm"))  # exclusive locking: no -shm file
    assert _header(path) == before  # header (schema cookie, version) as it was


async def test_retention_counts_buffer_time_not_the_wall_clock(tmp_path: Path) -> None:
    clock = VirtualClock()
    path = tmp_path / "b.db"
    async with opened(path, clock=clock, chunk_max_readings=10,
                      retention_s=Retention(low=3600)) as buf:
        await buf.append(readings(10, priority=Priority.LOW))
        clock.wall_offset_ms += 8 * 86_400_000  # the RTC jumps 8 days ahead
        await clock.advance(10)
        got = await buf.take(1 << 20)
        assert [c.chunk.priority for c in got] == [Priority.LOW]  # not expired
        assert got[0].age_ms == 10_000
        await buf.release([c.id for c in got], failed=False)
        await clock.advance(1800)
    # the age survives a restart (kept in the buffer), whatever the wall clock says now
    clock2 = VirtualClock(start_ms=1_000)  # an RTC reset to 1970
    async with opened(path, clock=clock2, chunk_max_readings=10,
                      retention_s=Retention(low=3600)) as buf:
        got = await buf.take(1 << 20)
        assert got and got[0].age_ms >= 1_810_000
        await buf.release([c.id for c in got], failed=False)
        await clock2.advance(1800)
        assert await buf.take(1 << 20) == []  # 3610 s of buffer time: expired
        s = buf.stats()
        assert s.evicted == {"retention:low": 1} and s.gap_readings == 10
