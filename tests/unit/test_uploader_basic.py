"""Uploader: the happy path, ordering, acks, on_ack samples, stats."""

from __future__ import annotations

from pymigrate.types import Ack, Priority
from tests.unit.uploader_helpers import advance, chunk, make, running


async def test_sends_everything_in_order_and_acks() -> None:
    samples: list[tuple[Ack, float, float]] = []
    clock, buf, (ul,), up = make(20, on_ack=lambda a, s, r: samples.append((a, s, r)))
    async with running(up):
        await advance(clock, 5)
    assert len(buf) == 0
    assert ul.seqs == [1 + 10 * i for i in range(20)]
    st = up.stats()
    assert st["batches_acked"] == len(ul.delivered) == len(samples)
    assert st["readings_acked"] == 200
    assert st["bytes_sent"] > 20 * 200
    assert st["uplinks"]["up0"]["breaker"] == "closed"
    assert st["rtt_ewma_s"] is not None and abs(st["rtt_ewma_s"] - 0.1) < 1e-6
    ack, sent_ms, recv_ms = samples[0]
    assert ack.status == "ok" and recv_ms - sent_ms == 100


async def test_batch_holds_one_device_and_priority_first() -> None:
    clock, buf, (ul,), up = make()
    buf.put_nowait(chunk(1))
    buf.put_nowait(chunk(100, device="other"))
    buf.put_nowait(chunk(50, priority=Priority.CRITICAL))
    async with running(up):
        await advance(clock, 5)
    assert len(buf) == 0
    assert all(len({c.device_id for c in b.chunks}) == 1 for b in ul.delivered)
    assert ul.seqs[0] == 50  # critical first
    ids = {b.batch_id for b in ul.sent}
    assert len(ids) == len(ul.sent)  # unique batch ids


async def test_new_data_wakes_the_uploader_without_polling() -> None:
    clock, buf, (ul,), up = make()
    async with running(up):
        await advance(clock, 3600)
        assert up.stats()["wakeups"] == 0  # nothing to do: asleep for an hour
        assert clock.next_deadline() is None  # and no timer armed
        buf.put_nowait(chunk(1))
        await advance(clock, 1)
        assert ul.seqs == [1]


async def test_sync_pings_while_the_clock_model_wants_samples() -> None:
    wanted = [True]
    samples: list[Ack] = []
    clock, buf, (ul,), up = make(wants_sync=lambda: wanted[0],
                                 on_ack=lambda a, s, r: samples.append(a))
    async with running(up):
        await advance(clock, 301)  # one empty batch a minute (sync_ping_s = 60)
        assert len(ul.sent) == 5 and all(b.chunks == [] for b in ul.sent)
        assert len(samples) == 5 and up.stats()["sync_pings"] == 5
        buf.put_nowait(chunk(1))
        await advance(clock, 30)  # real traffic gives samples too: no ping due
        assert len(ul.sent) == 6
        wanted[0] = False
        await advance(clock, 600)
        assert len(ul.sent) == 6  # synced: back to sleeping on data only
    assert up.stats()["batches_acked"] == 1 and up.stats()["attempts"] == {1: 1}


async def test_sync_ping_failures_and_refusals_lose_nothing() -> None:
    clock, buf, (ul,), up = make(wants_sync=lambda: True)
    ul.script("fail", "reject", "throttle:5")
    async with running(up):
        await advance(clock, 400)
    assert up.stats()["sync_pings"] >= 4
    assert up.stats()["dead_letters"] == {} and len(buf) == 0
