"""``buffer.retention_action``: what retention does with an expired chunk.

``gap`` (the default) deletes it with an ``expired`` gap record. ``dead_letter`` keeps it
on the device until the link is back, uploads it to the cloud's dead letters (reason
``expired``, its sequence numbers named by ``expired`` gaps in the ledger) and deletes
it only once the cloud acked it as dead-lettered.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import json
import time
from pathlib import Path
from typing import Any

import pytest

from agent.buffer import BufferConfig, Retention
from agent.codec import seal_chunk
from agent.config import parse_agent_config
from agent.sources import SourceBatch
from agent.sources.base import Emit
from agent.supervisor import Agent
from cloud.audit import main as completeness_main
from cloud.ingest import IngestService
from cloud.stores import SqliteStore
from pymigrate.clock import VirtualClock
from pymigrate.envelope import Batch, encode_batch
from pymigrate.errors import ConfigError
from pymigrate.types import Priority, Reading
from tests.support.loopback import LoopbackUplink
from tests.unit.buffer_helpers import opened
from transports.base import Incoming

DEV = "dev-r"


def readings(n: int, *, start: int = 1, priority: Priority = Priority.LOW) -> list[Reading]:
    return [Reading(DEV, "s", 1_767_225_600_000 + i * 1000, float(i), priority)
            for i in range(start, start + n)]


def test_retention_action_is_validated_naming_the_key() -> None:
    assert BufferConfig().retention_action == "gap"
    with pytest.raises(ConfigError, match=r"buffer\.retention_action.*dead_letter.*'drop'"):
        parse_agent_config({"buffer": {"retention_action": "drop"}})
    cfg = parse_agent_config({"buffer": {"retention_action": "dead_letter"}})
    assert cfg.buffer.retention_action == "dead_letter"


@pytest.mark.parametrize("action", ["gap", "dead_letter"])
async def test_expired_chunks_are_deleted_with_a_gap_or_kept_marked(tmp_path: Path,
                                                                     action: str) -> None:
    clock = VirtualClock()
    async with opened(tmp_path / "b.db", clock=clock, chunk_max_readings=10,
                      retention_s=Retention(low=60), retention_action=action) as buf:
        await buf.append(readings(10))
        await buf.append(readings(10, start=11, priority=Priority.NORMAL))
        await buf.flush()
        await clock.advance(120)  # past the LOW retention (buffer time)
        taken = await buf.take(1 << 20)
        gaps = await buf.take_gaps(DEV)
        if action == "gap":
            assert [(t.chunk.priority, t.expired) for t in taken] == [(Priority.NORMAL, False)]
            assert [g.gap.reason for g in gaps] == ["expired"]
        else:  # kept, marked for the uploader; no gap: nothing was given up yet
            assert sorted((t.chunk.priority, t.expired) for t in taken) == [
                (Priority.NORMAL, False), (Priority.LOW, True)]
            assert gaps == []
            assert buf.stats().evicted == {}


async def test_a_dead_letter_batch_is_kept_and_named_in_the_ledger(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "cloud.db")
    await store.open()
    try:
        svc = IngestService(store)
        rs = [Reading(DEV, "s", r.ts_ms, r.value, r.priority, seq=i + 1)
              for i, r in enumerate(readings(20))]
        payload = encode_batch(Batch(DEV, "b1", [seal_chunk(rs[:10]), seal_chunk(rs[10:])], 1,
                                     "i" * 16, 1, 20, dead_letter="expired"))
        for _ in range(2):  # the ack was lost: sent again
            ack = await svc.handle(Incoming(payload, "test", DEV, "peer"))
            assert (ack.status, ack.count, ack.dead_lettered) == ("ok", 20, True)
        assert await store.count(DEV) == 0  # not stored as readings
        assert {r for _, _, r in await store.dead_letters()} == {"expired"}
        (rep,) = await store.completeness(DEV)
        assert (rep.stored, rep.gaps, rep.unexplained) == (0, {"expired": 20}, 0)
    finally:
        await store.close()


class LowTicker:
    """``n`` LOW readings then ``m`` NORMAL ones, stamped by the agent's clock."""

    name = "ticker"

    def __init__(self, n: int, m: int) -> None:
        self.n, self.m = n, m

    async def run(self, emit: Emit) -> None:
        for i in range(self.n + self.m):
            prio = Priority.LOW if i < self.n else Priority.NORMAL
            await emit(SourceBatch([Reading(DEV, "s", time.time_ns() // 1_000_000, float(i),
                                            prio)]))


async def test_expired_readings_reach_the_cloud_dead_letters_and_are_accounted(
        tmp_path: Path) -> None:
    """The agent, its buffer and the real ingest on SQLite: LOW readings expire while the
    link is down; when it returns they are uploaded as dead letters, deleted on the
    device only after that ack, and ``pymigrate cloud completeness`` accounts for them."""
    store = SqliteStore(tmp_path / "cloud.db")
    await store.open()
    up = LoopbackUplink(IngestService(store), DEV)
    up.down = True
    cfg = parse_agent_config({
        "device": {"id": DEV, "data_dir": str(tmp_path / "var")},
        "buffer": {"chunk_max_age_s": 0.1, "commit_window_ms": 10,
                   "retention_s": {"low": 0.3}, "retention_action": "dead_letter"},
        "retry": {"backoff_base_s": 0.05, "backoff_cap_s": 0.2, "breaker_open_base_s": 0.1,
                  "breaker_open_cap_s": 0.2},
        "pipeline": {"drain_timeout_s": 1.0},
    })
    agent = Agent(cfg, uplinks=[up], sources=[LowTicker(30, 10)])
    task = asyncio.create_task(agent.run())
    try:
        await agent.started.wait()
        await _until(lambda: agent.ingest.counts["accepted"] == 40)
        await asyncio.sleep(0.8)  # offline past the LOW retention: expired, still here
        st = agent.buffer.stats()
        assert st.readings_pending["low"] == 30 and st.gaps_pending == 0
        up.down = False

        async def drained() -> bool:
            s = agent.buffer.stats()
            return sum(s.readings_pending.values()) == 0 and await store.count(DEV) == 10

        await _until(drained)
    finally:
        agent.request_stop()
        await asyncio.wait_for(task, 20)
        await store.close()
    stats = agent.uploader.stats()
    assert set(stats["dead_letters"]) == {"expired"}
    assert stats["readings_dead_lettered_in_cloud"] == 30 and stats["readings_acked"] == 10
    assert agent.buffer.stats().gaps_recorded == 0  # nothing given up on the device
    out = io.StringIO()
    rc = await asyncio.to_thread(completeness_main, [
        DEV, "--sqlite-path", str(tmp_path / "cloud.db"), "--json"], out=out)
    doc = json.loads(out.getvalue())
    (dev,) = doc["devices"]
    assert rc == 0, doc
    assert (dev["stored"], dev["gaps"], dev["unexplained"], dev["max_seq"]) == (
        10, {"expired": 30}, 0, 40), dev
    store = SqliteStore(tmp_path / "cloud.db")
    await store.open()
    try:
        assert {r for _, _, r in await store.dead_letters()} == {"expired"}
    finally:
        await store.close()


async def _until(pred: Any, limit_s: float = 15.0) -> None:
    """Wait (bounded) until ``pred()`` (a bool or an awaitable of one) holds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + limit_s
    while True:
        ok = pred()
        if inspect.isawaitable(ok):
            ok = await ok
        if ok:
            return
        assert loop.time() < end, "condition not reached in time"
        await asyncio.sleep(0.05)
