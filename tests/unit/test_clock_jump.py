"""An RTC jump while offline gives nothing up: readings stamped without a clock model
reach the cloud with true time (the agent, its durable buffer and the real cloud ingest
on SQLite, a loopback uplink; real time, about a second per agent run).

Each agent run is a process run: a fresh Agent on the same data directory. Its clock is
the real clock with a wrong RTC (``OffsetClock``) and a chosen boot id: the same boot id
means the monotonic clock is shared with the earlier runs (a process restart), another
one a reboot.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from agent.config import parse_agent_config
from agent.sources import SourceBatch
from agent.sources.base import Emit
from agent.supervisor import Agent
from cloud.ingest import IngestService
from cloud.stores import SqliteStore
from pymigrate.clock import OffsetClock, WallClock
from pymigrate.types import Quality, Reading
from tests.support.loopback import LoopbackUplink

DEV = "dev-j"
DAY_MS = 86_400_000


class RtcClock(OffsetClock):
    """The real clock with the RTC ``offset_ms`` off, in boot ``boot``."""

    def __init__(self, offset_ms: int, boot: str) -> None:
        super().__init__(WallClock(), offset_ms)
        self.boot = boot

    def boot_id(self) -> str:
        return self.boot


def true_ms() -> int:
    return time.time_ns() // 1_000_000


class Ticker:
    """Readings stamped by the agent's (possibly wrong) clock; remembers true times."""

    name = "ticker"

    def __init__(self, clock: RtcClock, truth: dict[float, int], start: int, n: int,
                 every_s: float = 0.01) -> None:
        self.clock, self.truth, self.start, self.n, self.every_s = clock, truth, start, n, every_s

    async def run(self, emit: Emit) -> None:
        for i in range(self.start, self.start + self.n):
            self.truth[float(i)] = true_ms()
            await emit(SourceBatch([Reading(DEV, "t", self.clock.time_ms(), float(i))]))
            await asyncio.sleep(self.every_s)


class Cloud:
    def __init__(self, path: Path) -> None:
        self.store = SqliteStore(path)
        self.service = IngestService(self.store)  # true time, max_future_s = 1 day
        self.up = LoopbackUplink(self.service, DEV)

    async def rows(self) -> dict[float, tuple[int, int, int]]:
        """value -> (ts_ms, quality, uncert_ms) of every stored reading."""
        return {r.value: (r.ts_ms, r.quality, r.uncert_ms)
                for r in await self.store.query(DEV)}

    async def dead_letters(self) -> list[tuple[str, str, str]]:
        return await self.store.dead_letters()


@asynccontextmanager
async def cloud(tmp_path: Path) -> AsyncIterator[Cloud]:
    c = Cloud(tmp_path / "cloud.db")
    await c.store.open()
    try:
        yield c
    finally:
        await c.store.close()


def config(tmp_path: Path, **timesync: Any) -> Any:
    return parse_agent_config({
        "device": {"id": DEV, "data_dir": str(tmp_path / "var")},
        "buffer": {"chunk_max_age_s": 0.2, "commit_window_ms": 20},
        "retry": {"backoff_base_s": 0.05, "backoff_cap_s": 0.2, "sync_ping_s": 0.3},
        "pipeline": {"drain_timeout_s": 0.5},
        "timesync": timesync,
    })


async def run(tmp_path: Path, c: Cloud, clock: RtcClock, truth: dict[float, int], *,
              start: int, n: int, online: bool, until: Any = None,
              **timesync: Any) -> Agent:
    """One agent run: ``n`` readings, then (online) wait for ``until`` or the drain."""
    c.up.down = not online
    agent = Agent(config(tmp_path, **timesync), clock=clock, uplinks=[c.up],
                  sources=[Ticker(clock, truth, start, n)])
    task = asyncio.create_task(agent.run())
    try:
        await agent.started.wait()
        end = asyncio.get_running_loop().time() + 15
        while agent.ingest.counts["accepted"] < n or (
                until is not None and not await until()):
            assert asyncio.get_running_loop().time() < end, agent.status()
            await asyncio.sleep(0.05)
    finally:
        agent.request_stop()
        await asyncio.wait_for(task, 20)
    return agent


def stored_all(c: Cloud, n: int) -> Any:
    async def pred() -> bool:
        return len(await c.rows()) >= n
    return pred


async def check(c: Cloud, truth: dict[float, int], *, tolerance_ms: int,
                dead_letters: tuple[str, ...] = ()) -> dict[float, Any]:
    rows = await c.rows()
    assert sorted(rows) == sorted(truth), (len(rows), len(truth))
    errors = {v: abs(rows[v][0] - truth[v]) for v in truth}
    assert max(errors.values()) <= tolerance_ms, sorted(errors.items(), key=lambda x: -x[1])[:5]
    assert {r for _, _, r in await c.dead_letters()} <= set(dead_letters)
    (rep,) = await c.store.completeness(DEV)
    assert rep.unexplained == 0 and rep.gaps == {} and rep.stored == len(truth), rep
    return rows


async def test_jumped_rtc_at_start_while_offline_is_mapped_once_synced(tmp_path: Path) -> None:
    """A fresh agent whose RTC is 8 days ahead, offline: its readings are held, then sent
    with true time once the first ping gives a model (not refused as future, not given
    up)."""
    truth: dict[float, int] = {}
    async with cloud(tmp_path) as c:
        clk = RtcClock(8 * DAY_MS, "boot-a")
        await run(tmp_path, c, clk, truth, start=0, n=40, online=False)
        agent = await run(tmp_path, c, clk, truth, start=40, n=10, online=True,
                          until=stored_all(c, 50))
        rows = await check(c, truth, tolerance_ms=2_000)
    assert agent.clockjournal is not None
    assert agent.clockjournal.counts["readings_restamped"] >= 40
    # the first run's readings were mapped by the model (same boot: corrected, not anchored)
    assert all(rows[float(i)][1] & Quality.TIME_CORRECTED for i in range(40))
    assert agent.uploader.counts["clock_rejections"] == 0


async def test_restart_into_a_jump_and_back_keeps_every_time_right(tmp_path: Path) -> None:
    """Synced and buffering normally, then offline: a restart with the RTC 8 days ahead
    and one back on the right time. The model is kept with the boot id: every run
    corrects from its first reading, before and after the jump."""
    truth: dict[float, int] = {}
    async with cloud(tmp_path) as c:
        ok = RtcClock(0, "boot-a")
        await run(tmp_path, c, ok, truth, start=0, n=30, online=True, until=stored_all(c, 30))
        c.up.down = True
        await run(tmp_path, c, ok, truth, start=30, n=20, online=False)
        jumped = await run(tmp_path, c, RtcClock(8 * DAY_MS, "boot-a"), truth, start=50, n=30,
                           online=False)
        assert jumped.timesync.counters["samples_imported"] > 0
        assert jumped.timesync.synced()  # from its first reading, without any ack
        await run(tmp_path, c, ok, truth, start=80, n=10, online=True, until=stored_all(c, 90))
        rows = await check(c, truth, tolerance_ms=2_000)
    assert all(rows[float(i)][1] & Quality.TIME_CORRECTED for i in range(50, 80))


async def test_jump_in_another_boot_is_mapped_through_the_buffer_clock(tmp_path: Path) -> None:
    """A reboot with the RTC 8 days ahead, offline, then a reboot on the right time: the
    first boot never had a model; its readings are placed through the buffer's own
    clock (monotonic time across runs), flagged anchored and uncertain."""
    truth: dict[float, int] = {}
    async with cloud(tmp_path) as c:
        await run(tmp_path, c, RtcClock(8 * DAY_MS, "boot-1"), truth, start=0, n=30,
                  online=False)
        agent = await run(tmp_path, c, RtcClock(0, "boot-2"), truth, start=30, n=10,
                          online=True, until=stored_all(c, 40))
        # the time the device was off (here: the restart) is unknown: seconds, not days
        rows = await check(c, truth, tolerance_ms=5_000)
    anchored = Quality.TIME_CORRECTED | Quality.TIME_ANCHORED | Quality.TIME_UNCERTAIN
    assert all(rows[float(i)][1] & anchored == anchored for i in range(30))
    assert agent.clockjournal is not None and agent.clockjournal.counts["sessions_fixed"] >= 1


async def test_a_right_rtc_in_another_boot_keeps_its_stamps(tmp_path: Path) -> None:
    """The same reboot with the RTC right: its stamps lie between what was known before
    and the latest possible time, so they are kept (not anchored, not shifted by the
    restart's downtime)."""
    truth: dict[float, int] = {}
    async with cloud(tmp_path) as c:
        await run(tmp_path, c, RtcClock(0, "boot-1"), truth, start=0, n=30, online=False)
        await asyncio.sleep(1.0)  # off for a second: the buffer clock does not count it
        await run(tmp_path, c, RtcClock(0, "boot-2"), truth, start=30, n=10, online=True,
                  until=stored_all(c, 40))
        rows = await check(c, truth, tolerance_ms=200)
    assert not any(rows[float(i)][1] & Quality.TIME_ANCHORED for i in range(40))


async def test_unsynced_readings_sent_anyway_are_refused_retriably_then_mapped(
        tmp_path: Path) -> None:
    """Without the hold (``hold_answers = 0``) the jumped readings go as stamped: the
    cloud refuses them as ``clock_unsynced`` (retriable, nothing dead-lettered, no gap),
    its answer is a clock sample, and they are sent again with true time."""
    truth: dict[float, int] = {}
    async with cloud(tmp_path) as c:
        clk = RtcClock(8 * DAY_MS, "boot-a")
        await run(tmp_path, c, clk, truth, start=0, n=30, online=False, hold_answers=0)
        agent = await run(tmp_path, c, clk, truth, start=30, n=5, online=True,
                          until=stored_all(c, 35), hold_answers=0)
        # each refusal is on record (rate-limited), none lets the device give data up
        await check(c, truth, tolerance_ms=2_000, dead_letters=("clock_unsynced",))
        assert c.service.counters["rejected:clock_unsynced"] >= 1
    assert agent.uploader.counts["clock_rejections"] >= 1
    assert agent.uploader.counts["readings_dead_lettered"] == 0
    assert agent.status()["clock"]["sessions_raw"] >= 1
