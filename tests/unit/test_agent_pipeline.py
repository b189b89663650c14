"""The agent end to end in-process: sources -> pipeline -> durable buffer -> uploader ->
the real cloud ingest code and SQLite store (a loopback uplink, no network)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from agent.config import SensorPriority, parse_agent_config
from agent.pipeline import PriorityMap
from agent.sources import SourceBatch
from agent.sources.base import Emit
from agent.supervisor import Agent
from cloud.ingest import IngestService
from cloud.stores import SqliteStore
from pymigrate.types import Priority, Reading
from tests.support.loopback import LoopbackUplink


class ScriptedSource:
    """Emits prepared batches, records when each source ack arrives."""

    name = "scripted"

    def __init__(self, batches: list[SourceBatch], gate: asyncio.Event | None = None) -> None:
        self.batches = batches
        self.gate = gate

    async def run(self, emit: Emit) -> None:
        if self.gate is not None:
            await self.gate.wait()
        for b in self.batches:
            await emit(b)


@asynccontextmanager
async def run_agent(tmp_path: Path, overrides: dict[str, Any] | None = None, *,
                    sources: list[Any] | None = None,
                    device: str = "dev-1") -> AsyncIterator[tuple[Agent, SqliteStore,
                                                                  LoopbackUplink]]:
    """Start store + agent; on exit stop the agent gracefully and close the store."""
    store = SqliteStore(tmp_path / "cloud.db")
    await store.open()
    service = IngestService(store)
    data: dict[str, Any] = {
        "device": {"id": device, "data_dir": str(tmp_path / "var")},
        "sources": [{"type": "weather", "sensors": 4, "interval_s": 0.01}],
        "buffer": {"chunk_max_age_s": 0.2, "commit_window_ms": 20},
        "retry": {"backoff_base_s": 0.05, "backoff_cap_s": 0.2},
        "pipeline": {"drain_timeout_s": 5.0},
    }
    for k, v in (overrides or {}).items():
        data[k] = v
    cfg = parse_agent_config(data)
    up = LoopbackUplink(service, device)
    agent = Agent(cfg, uplinks=[up], sources=sources)
    task = asyncio.create_task(agent.run())
    await agent.started.wait()
    try:
        yield agent, store, up
    finally:
        agent.request_stop()
        await asyncio.wait_for(task, 30)
        await store.close()


async def _until(pred: Any, limit_s: float = 10.0) -> None:
    """Wait (bounded) until ``pred()`` holds: no fixed sleeps that flake under load."""
    end = asyncio.get_running_loop().time() + limit_s
    while not pred():
        assert asyncio.get_running_loop().time() < end, "condition not reached in time"
        await asyncio.sleep(0.02)


async def _seqs(store: SqliteStore, device: str) -> list[int]:
    async with store.db.execute("SELECT seq FROM readings WHERE device_id = ? ORDER BY seq",
                                (device,)) as cur:
        return [r[0] async for r in cur]


async def test_every_accepted_reading_is_stored_once(tmp_path: Path) -> None:
    async with run_agent(tmp_path) as (agent, _store, _):
        await asyncio.sleep(0.6)
    accepted = agent.ingest.counts["accepted"]
    assert accepted > 50
    assert agent.stopped_cleanly
    # the store was closed by the context manager: reopen it to inspect
    st = SqliteStore(tmp_path / "cloud.db")
    await st.open()
    try:
        seqs = await _seqs(st, "dev-1")
    finally:
        await st.close()
    assert seqs == list(range(1, accepted + 1))  # every accepted seq, once, no gaps
    assert agent.status()["delivered"] == accepted


async def test_invalid_readings_are_rejected_with_reasons(tmp_path: Path) -> None:
    import time

    now = time.time_ns() // 1_000_000
    acks: list[int] = []

    async def ack() -> None:
        acks.append(1)

    src = ScriptedSource([SourceBatch([
        Reading("dev-1", "ok", now, 1.0),
        Reading("dev-1", "nan", now, math.nan),
        Reading("dev-1", "inf", now, math.inf),
        Reading("dev-1", "future", now + 10 * 86_400_000, 1.0),
        Reading("dev-1", "ancient", 0, 1.0),
        Reading("dev-1", "", now, 1.0),
    ], ack=ack, rejects=[("malformed_json", "topic/x")])])
    async with run_agent(tmp_path, sources=[src]) as (agent, _, _):
        await _until(lambda: acks == [1])
    rej = agent.validator.rejected
    assert rej["nan"] == 1 and rej["infinite"] == 1
    assert rej["timestamp_past"] == 1 and rej["bad_sensor_name"] == 1
    assert rej["malformed_json"] == 1
    # a timestamp 10 days ahead is an RTC jump: re-anchored on the monotonic clock and
    # flagged, not dropped (the time corrector runs before validation)
    assert rej["timestamp_future"] == 0
    assert agent.ingest.counts["accepted"] == 2
    st = SqliteStore(tmp_path / "cloud.db")
    await st.open()
    try:
        (fut,) = await st.query("dev-1", "future")
    finally:
        await st.close()
    assert fut.raw_ts_ms == now + 10 * 86_400_000
    assert abs(fut.ts_ms - now) < 60_000 and fut.quality != 0
    assert acks == [1]  # acked once the valid readings were committed


async def test_source_ack_only_after_commit(tmp_path: Path) -> None:
    import time

    now = time.time_ns() // 1_000_000
    seen: list[int] = []
    holder: dict[str, Agent] = {}

    async def ack() -> None:
        # the buffer reports the reading as accepted (committed) before the source ack
        seen.append(holder["a"].buffer.stats().accepted_total)

    gate = asyncio.Event()
    src = ScriptedSource([SourceBatch([Reading("dev-1", "t", now, 2.0)], ack=ack)], gate)
    async with run_agent(tmp_path, sources=[src]) as (agent, _, _):
        holder["a"] = agent
        gate.set()
        await _until(lambda: bool(seen))
    assert seen and seen[0] >= 1


async def test_edge_dedup_drops_redelivered_batches(tmp_path: Path) -> None:
    import time

    now = time.time_ns() // 1_000_000
    batch = [Reading("dev-1", "t", now + i, float(i)) for i in range(10)]
    src = ScriptedSource([SourceBatch(batch), SourceBatch(list(batch))])
    async with run_agent(tmp_path, sources=[src]) as (agent, _, _):
        await _until(lambda: agent.ingest.counts["received"] == 20)
    assert agent.ingest.counts["duplicates_dropped"] == 10
    assert agent.ingest.counts["accepted"] == 10


async def test_priorities_and_aggregation_reach_the_store(tmp_path: Path) -> None:
    overrides = {
        "priorities": [{"match": "temp*", "priority": "high"}],
        "aggregation": {"rules": [{"name": "hum10", "match": "humidity",
                                   "window": {"type": "count", "count": 5},
                                   "functions": ["min", "max", "count"]}]},
    }
    async with run_agent(tmp_path, overrides) as (_agent, _, _):
        await asyncio.sleep(0.6)
    st = SqliteStore(tmp_path / "cloud.db")
    await st.open()
    try:
        temps = await st.query("dev-1", "temperature")
        hums = await st.query("dev-1", "humidity")
    finally:
        await st.close()
    assert temps and all(r.priority == Priority.HIGH for r in temps)
    assert hums and all(r.agg is not None and r.agg.rule == "hum10" for r in hums)
    counts = [r.value for r in hums if r.agg and r.agg.fn == "count"
              and not r.agg.rule.endswith("~partial")]
    assert counts and all(c == 5.0 for c in counts)


async def test_outage_buffers_then_delivers(tmp_path: Path) -> None:
    async with run_agent(tmp_path) as (agent, _, up):
        up.down = True
        await asyncio.sleep(0.5)
        assert agent.status()["buffered_readings"] + agent.buffer.stats().open_chunks >= 0
        assert agent.status()["delivered"] == 0
        up.down = False
        await asyncio.sleep(0.8)
    st = SqliteStore(tmp_path / "cloud.db")
    await st.open()
    try:
        seqs = await _seqs(st, "dev-1")
    finally:
        await st.close()
    assert seqs == list(range(1, agent.ingest.counts["accepted"] + 1))


def test_priority_map() -> None:
    pm = PriorityMap([SensorPriority("alarm*", "critical"), SensorPriority("*", "low")])
    rs = pm.apply([Reading("d", "alarm1", 0, 1.0), Reading("d", "t", 0, 1.0),
                   Reading("d", "t", 0, 1.0, priority=Priority.CRITICAL)])
    assert [r.priority for r in rs] == [Priority.CRITICAL, Priority.NORMAL, Priority.CRITICAL]
    assert PriorityMap([]).apply(rs) == rs


@pytest.fixture(autouse=True)
def _quiet_logs() -> None:
    from pymigrate.logsetup import setup_logging

    setup_logging("console", "warning")


async def test_window_state_survives_a_restart(tmp_path: Path) -> None:
    """A window half full at a graceful stop continues after the restart: neither lost
    nor double-counted."""
    import time

    now = time.time_ns() // 1_000_000
    rules = {"aggregation": {"rules": [{"name": "c10", "match": "v",
                                        "window": {"type": "count", "count": 10},
                                        "functions": ["count", "sum", "min", "max"]}]}}
    values = [float(i) for i in range(30)]
    first = ScriptedSource([SourceBatch([Reading("dev-1", "v", now + i, values[i])])
                            for i in range(15)])
    async with run_agent(tmp_path, rules, sources=[first]) as (agent, _, _):
        await _until(lambda: agent.ingest.counts["received"] == 15)
    second = ScriptedSource([SourceBatch([Reading("dev-1", "v", now + i, values[i])])
                             for i in range(15, 30)])
    async with run_agent(tmp_path, rules, sources=[second]) as (agent, _, _):
        await _until(lambda: agent.ingest.counts["received"] == 15)
    st = SqliteStore(tmp_path / "cloud.db")
    await st.open()
    try:
        rows = await st.query("dev-1", "v")
    finally:
        await st.close()
    by_fn: dict[str, list[float]] = {}
    for r in sorted(rows, key=lambda r: r.ts_ms):
        assert r.agg is not None
        by_fn.setdefault(r.agg.fn, []).append(r.value)
    assert by_fn["count"] == [10.0, 10.0, 10.0]
    assert by_fn["sum"] == [sum(values[0:10]), sum(values[10:20]), sum(values[20:30])]
    assert by_fn["min"] == [0.0, 10.0, 20.0] and by_fn["max"] == [9.0, 19.0, 29.0]


async def test_time_windows_close_on_their_deadline(tmp_path: Path) -> None:
    """A tumbling window closes by wall time (the stage sleeps until the deadline) even
    when no further reading of that series arrives."""
    rules = {"aggregation": {"rules": [{"name": "t1s", "match": "temperature",
                                        "window": {"type": "tumbling", "size_s": 0.2},
                                        "functions": ["count", "avg"]}]}}
    async with run_agent(tmp_path, rules) as (agent, _, _):
        await _until(lambda: agent.aggregator.stats().aggregates_out >= 4)
    assert agent.ingest.counts["accepted"] > 0


class _FullOnceBuffer:
    """A buffer stub whose first append reports a full disk."""

    def __init__(self) -> None:
        self.calls = 0
        self.stored: list[Reading] = []

    async def append(self, readings: list[Reading], *,
                     state: tuple[str, bytes] | None = None, dedup: bytes = b"") -> list[Reading]:
        from pymigrate.errors import BufferFull

        self.calls += 1
        if self.calls == 1:
            raise BufferFull("disk full", reason="disk_full")
        self.stored.extend(readings)
        return list(readings)

    async def put_state(self, key: str, value: bytes) -> None:
        return None

    async def get_state(self, key: str) -> bytes | None:
        return None


async def test_buffer_full_holds_the_batch_and_retries() -> None:
    from agent.aggregate import AggregationConfig, Aggregator
    from agent.config import ValidationConfig
    from agent.dedup import DedupConfig, Deduplicator
    from agent.pipeline import IngestStage
    from agent.timesync import TimeCorrector, TimeSyncConfig
    from agent.validate import Validator
    from pymigrate.clock import VirtualClock

    clock = VirtualClock()
    buf = _FullOnceBuffer()
    acked: list[int] = []

    async def ack() -> None:
        acked.append(1)

    stage = IngestStage(asyncio.Queue(), buffer=buf, clock=clock,  # type: ignore[arg-type]
                        validator=Validator(ValidationConfig(), now_ms=clock.time_ms),
                        dedup=Deduplicator(DedupConfig(), clock=clock),
                        timesync=TimeCorrector(TimeSyncConfig(), clock=clock),
                        aggregator=Aggregator(AggregationConfig(), clock=clock),
                        priorities=PriorityMap([]))
    task = asyncio.create_task(stage.process(SourceBatch(
        [Reading("d", "t", clock.time_ms(), 1.0)], ack=ack)))
    await clock.settle()
    assert acked == [] and stage.counts["buffer_full_waits"] == 1  # held, not acked
    await clock.advance(1.0)
    await task
    assert acked == [1] and len(buf.stored) == 1


async def test_timestamps_that_came_with_the_data_are_kept(tmp_path: Path) -> None:
    """A replayed 2018 recording keeps its timestamps: the gateway's clock model does not
    apply to them (only readings stamped by the gateway's own clock are corrected)."""
    p = tmp_path / "old.csv"
    p.write_text("timestamp,a\n2018-10-18T00:00:00Z,1.5\n2018-10-18T00:01:00Z,2.5\n")
    overrides = {"sources": [{"type": "replay", "path": str(p)}]}
    async with run_agent(tmp_path, overrides) as (agent, _, _):
        await _until(lambda: agent.ingest.counts["accepted"] == 2)
    st = SqliteStore(tmp_path / "cloud.db")
    await st.open()
    try:
        rows = await st.query("dev-1", "a")
    finally:
        await st.close()
    assert [(r.ts_ms, r.value, r.quality) for r in rows] == [
        (1539820800000, 1.5, 0), (1539820860000, 2.5, 0)]


class _AlwaysFullBuffer:
    def __init__(self) -> None:
        self.calls = 0

    async def append(self, readings: list[Reading], *, state: object = None,
                     dedup: bytes = b"") -> list[Reading]:
        self.calls += 1
        from pymigrate.errors import BufferFull

        raise BufferFull("no room", reason="disk_full")


def _stage(buf: object, clock: object) -> object:
    from agent.aggregate import AggregationConfig, Aggregator
    from agent.config import ValidationConfig
    from agent.dedup import DedupConfig, Deduplicator
    from agent.pipeline import IngestStage
    from agent.timesync import TimeCorrector, TimeSyncConfig
    from agent.validate import Validator

    return IngestStage(asyncio.Queue(), buffer=buf, clock=clock,  # type: ignore[arg-type]
                       validator=Validator(ValidationConfig(), now_ms=clock.time_ms),  # type: ignore[attr-defined]
                       dedup=Deduplicator(DedupConfig(), clock=clock),  # type: ignore[arg-type]
                       timesync=TimeCorrector(TimeSyncConfig(), clock=clock),  # type: ignore[arg-type]
                       aggregator=Aggregator(AggregationConfig(), clock=clock),  # type: ignore[arg-type]
                       priorities=PriorityMap([]))


async def test_full_disk_drops_live_samples_counted_and_holds_the_rest() -> None:
    from pymigrate.clock import VirtualClock

    clock = VirtualClock()
    stage: Any = _stage(_AlwaysFullBuffer(), clock)
    acked: list[int] = []

    async def ack() -> None:
        acked.append(1)

    # a live sample (weather source): dropped with a counted reason, not acked, not held
    await stage.process(SourceBatch([Reading("d", "t", clock.time_ms(), 1.0)],
                                    ack=ack, sampled=True))
    assert stage.counts["dropped_disk_full"] == 1 and acked == []
    # an acknowledgeable message (MQTT QoS 1): held and retried, never acked
    held = asyncio.create_task(stage.process(SourceBatch(
        [Reading("d", "t", clock.time_ms() + 1, 2.0)], ack=ack)))
    await clock.advance(30)
    assert not held.done() and acked == [] and stage.counts["buffer_full_waits"] > 2
    # SIGTERM: the held batch gives up at once (un-acked: the broker redelivers it)
    stop = asyncio.create_task(stage.stop())
    await asyncio.wait_for(held, 2)
    await stop
    assert acked == [] and stage.counts["not_accepted_at_stop"] == 1
