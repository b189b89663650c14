"""A source that delivers again after the agent died (an un-acked QoS 1 message, a
replayed file) gets no new sequence numbers: the edge-dedup fingerprints are committed
with the readings they admitted and restored at start."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from agent.sources import SourceBatch
from agent.supervisor import Agent
from pymigrate.types import Reading
from tests.unit.test_agent_pipeline import ScriptedSource, _seqs, _until, run_agent


def _batch(now: int, n: int, *, acked: list[int]) -> SourceBatch:
    async def ack() -> None:
        acked.append(1)

    return SourceBatch([Reading("dev-1", f"s{i % 3}", now + i * 1000, float(i))
                        for i in range(n)], ack=ack, local_clock=False)


async def test_redelivery_after_a_crash_is_not_stored_twice(tmp_path: Path) -> None:
    now = time.time_ns() // 1_000_000 - 3_600_000
    acked: list[int] = []
    first = ScriptedSource([_batch(now, 30, acked=acked)])
    async with run_agent(tmp_path, {"sources": []}, sources=[first]) as (agent, store, _):
        await _until(lambda: agent.ingest.counts["accepted"] == 30)
        # the "crash": the agent stops, the source never saw (say) its ack arrive, so
        # the broker delivers the same message again to the next process
    redelivery = ScriptedSource([_batch(now, 30, acked=acked), _batch(now + 30_000, 5,
                                                                      acked=acked)])
    holder: list[Agent] = []
    async with run_agent(tmp_path, {"sources": []}, sources=[redelivery]) as (agent, store, _):
        holder.append(agent)
        await _until(lambda: len(acked) == 3)
        await asyncio.sleep(0.3)
        assert agent.dedup.stats()["restored"] == 30
        assert agent.ingest.counts["duplicates_dropped"] == 30
        assert agent.ingest.counts["accepted"] == 5
        await _until(lambda: agent.uploader.stats()["readings_acked"] >= 5)
        seqs = await _seqs(store, "dev-1")
    assert seqs == list(range(1, 36))  # 30 + 5 new, each once


def test_a_message_stamped_on_arrival_is_known_by_its_identity() -> None:
    from agent.dedup import DedupConfig, Deduplicator
    from agent.sources.mqtt import message_key
    from pymigrate.clock import VirtualClock

    d = Deduplicator(DedupConfig(), clock=VirtualClock())
    body = b'{"temp": 21.5}'
    first = [Reading("dev-1", "temp", 1_000, 21.5)]
    again = [Reading("dev-1", "temp", 1_750, 21.5)]  # stamped later on redelivery
    fps: list[int] = []
    assert d.filter_keyed(first, message_key("t/1", 7, body), fps) == first and len(fps) == 1
    assert d.filter_keyed(again, message_key("t/1", 7, body)) == []  # same message
    assert d.filter_keyed(again, message_key("t/1", 8, body)) == again  # a new message
    assert d.filter(again) == again  # content alone would not have caught it
