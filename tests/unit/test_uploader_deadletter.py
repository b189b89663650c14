"""Uploader: dead-lettering (rejected, expired, exhausted, oversized), drain, misc."""

from __future__ import annotations

import asyncio

import pytest

from pymigrate.types import Priority
from tests.unit.fakes_uplink import FakeUplink
from tests.unit.uploader_helpers import advance, cfg, chunk, make, running


async def test_rejected_batch_is_bisected_and_only_the_bad_chunk_dead_lettered() -> None:
    dead: list[tuple[list[int], str]] = []

    async def keep(items: object, reason: str) -> None:
        dead.append(([i.chunk.seq_first for i in items], reason))  # type: ignore[attr-defined]

    clock, buf, (ul,), up = make(5, on_dead_letter=keep)
    ul.reject_seqs = {25}  # inside the chunk starting at seq 21
    async with running(up):
        await advance(clock, 30)
    assert len(buf) == 0
    assert sorted(ul.seqs) == [1, 11, 31, 41]
    assert dead == [([21], "rejected:decode")]
    st = up.stats()
    assert st["dead_letters"] == {"rejected": 1}
    assert st["batches_rejected"] == 2
    assert st["uplinks"]["up0"]["breaker"] == "closed"


@pytest.mark.parametrize("action", ["reject", "reject_ack"])
async def test_rejection_of_a_single_chunk_dead_letters_it(action: str) -> None:
    clock, buf, (ul,), up = make(1)
    ul.script(action)
    async with running(up):
        await advance(clock, 10)
    assert len(buf) == 0 and ul.delivered == []
    assert up.stats()["dead_letters"] == {"rejected": 1}
    assert up.counts["readings_dead_lettered"] == 10


async def test_expired_and_exhausted_chunks_are_dead_lettered_loudly() -> None:
    events: list[str] = []
    clock, buf, (ul,), up = make(config=cfg(retention_s=3600, max_attempts=3),
                                 on_event=lambda n, f: events.append(f"{n}:{f['reason']}"))
    buf.put_nowait(chunk(1), age_ms=7200_000)  # buffered two hours already
    buf.put_nowait(chunk(11))
    ul.default = "fail"
    async with running(up):
        await advance(clock, 600)
    assert len(buf) == 0
    assert ul.delivered == []
    assert up.stats()["dead_letters"] == {"expired": 1, "max_attempts": 1}
    assert sorted(events) == ["dead_letter:expired", "dead_letter:max_attempts"]
    assert [b.chunks[0].seq_first for b in ul.sent] == [11, 11, 11]


async def test_a_wall_clock_jump_never_expires_data() -> None:
    # a chunk whose wall-clock stamp says "8 days old" (an RTC that jumped) is not old:
    # age is measured on the buffer's monotonic clock
    clock, buf, (ul,), up = make(config=cfg(retention_s=7 * 86400))
    buf.put_nowait(chunk(1, priority=Priority.CRITICAL),
                   created_ms=clock.time_ms() - 8 * 86400_000)
    async with running(up):
        await advance(clock, 30)
    assert up.stats()["dead_letters"] == {}
    assert ul.seqs == [1]


async def test_no_retention_by_default() -> None:
    clock, buf, (ul,), up = make()
    assert up.cfg.retention_s == 0
    buf.put_nowait(chunk(1), age_ms=30 * 86400_000)  # a month offline
    async with running(up):
        await advance(clock, 30)
    assert up.stats()["dead_letters"] == {} and ul.seqs == [1]


async def test_too_big_for_the_uplink_is_split_or_dead_lettered() -> None:
    clock, buf, (ul,), up = make(config=cfg(batch_initial_bytes=64 * 1024))
    ul.max_payload = 2000
    for s in range(6):
        buf.put_nowait(chunk(1 + 10 * s, nbytes=600))
    buf.put_nowait(chunk(100, nbytes=5000))
    async with running(up):
        await advance(clock, 30)
    assert len(buf) == 0
    assert ul.seqs == [1 + 10 * s for s in range(6)]
    assert up.stats()["dead_letters"] == {"oversized": 1}


async def test_chunk_too_big_for_primary_goes_via_a_bigger_uplink() -> None:
    c = cfg(breaker_failures=2, breaker_open_base_s=10, breaker_open_cap_s=10)
    clock, buf, (small, big), up = make(uplinks=2, config=c)
    small.max_payload = 1000
    buf.put_nowait(chunk(1, nbytes=3000))
    buf.put_nowait(chunk(11, nbytes=100))
    big.script("fail")  # the bigger uplink unavailable once: the chunk waits, no spin
    async with running(up):
        await advance(clock, 30)
    assert len(buf) == 0
    assert big.seqs == [1] and small.seqs == [11]
    assert up.stats()["uplinks"]["up0"]["oversized_for_uplink"] >= 1
    assert up.stats()["dead_letters"] == {}


async def test_drain_sends_pending_then_stops_run() -> None:
    clock, buf, _ups, up = make(10)
    task = asyncio.create_task(up.run())
    await clock.settle()
    drain = asyncio.create_task(up.drain(30))
    await advance(clock, 5)
    assert drain.done() and drain.result() is True
    await asyncio.wait_for(task, 1)
    assert len(buf) == 0 and up.stats()["inflight"] == 0


async def test_drain_gives_up_at_the_deadline_and_releases_in_flight() -> None:
    clock, buf, (ul,), up = make(3)
    ul.default = "timeout"
    drain = asyncio.create_task(up.drain(5))  # run() not started: drain runs it
    await advance(clock, 6)
    assert drain.done() and drain.result() is False
    assert len(buf) == 3 and buf.inflight == 0
    # and it can run again afterwards
    ul.default = "ok"
    async with running(up):
        await advance(clock, 30)
    assert len(buf) == 0


async def test_stop_cancels_and_releases_and_double_run_refused() -> None:
    clock, buf, (ul,), up = make(2)
    ul.delay_s = 100
    task = asyncio.create_task(up.run())
    await advance(clock, 1)
    assert buf.inflight >= 1
    with pytest.raises(RuntimeError):
        await up.run()
    up.stop()
    await advance(clock, 1)
    await asyncio.wait_for(task, 1)
    assert buf.inflight == 0 and len(buf) == 2


def test_needs_an_uplink() -> None:
    from agent.uploader import Uploader
    from pymigrate.clock import VirtualClock
    from tests.unit.fakes_buffer import FakeBuffer

    clock = VirtualClock()
    with pytest.raises(ValueError):
        Uploader(FakeBuffer(clock), [], device_id="d", clock=clock)
    up = Uploader(FakeBuffer(clock), [FakeUplink(clock)], device_id="d", clock=clock)
    assert up.cfg.seed is None and up.stats()["profile"] == "unmetered"


async def test_duplicate_acks_count_as_delivered() -> None:
    clock, buf, (ul,), up = make(2, config=cfg(batch_initial_bytes=1024, batch_min_bytes=1024))
    ul.script("dup")
    async with running(up):
        await advance(clock, 5)
    assert len(buf) == 0 and up.stats()["duplicates"] == 1
