"""Uploader over the real durable buffer (SQLite WAL in a temp dir, wall clock, fake uplink):
order, release-to-head, attempts that survive a restart, ack deletes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.uploader import Uploader
from pymigrate.clock import WallClock
from pymigrate.types import Ack, Priority, Reading
from tests.unit.fakes_uplink import FakeUplink
from tests.unit.uploader_helpers import cfg

buffer = pytest.importorskip("agent.buffer")


async def _open(path: Path, clock: WallClock) -> object:
    buf = buffer.DurableBuffer(buffer.BufferConfig(path=str(path), chunk_max_readings=100),
                               clock=clock)
    await buf.open()
    return buf


async def _fill(buf: object, n: int, clock: WallClock, prio: Priority = Priority.NORMAL) -> None:
    rs = [Reading("dev-1", f"s{i % 3}", clock.time_ms() - 10_000 + i, float(i), prio)
          for i in range(n)]
    await buf.append(rs)  # type: ignore[attr-defined]
    await buf.flush()  # type: ignore[attr-defined]


async def _deliver(buf: object, ul: FakeUplink, clock: WallClock, readings: int,
                   **kw: object) -> Uploader:
    done = asyncio.Event()
    got = 0

    def on_ack(ack: Ack, sent: float, recv: float) -> None:
        nonlocal got
        got += ack.accepted
        if got >= readings:
            done.set()

    up = Uploader(buf, [ul], device_id="dev-1", clock=clock,  # type: ignore[arg-type]
                  config=cfg(backoff_base_s=0.01, backoff_cap_s=0.05, **kw), on_ack=on_ack)
    task = asyncio.create_task(up.run())
    try:
        await asyncio.wait_for(done.wait(), 10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return up


async def test_real_buffer_in_order_with_retry_and_restart(tmp_path: Path) -> None:
    clock = WallClock()
    path = tmp_path / "buf.db"
    buf = await _open(path, clock)
    await _fill(buf, 500, clock)
    ul = FakeUplink(clock, delay_s=0.001)
    ul.script("fail", "timeout")
    up = await _deliver(buf, ul, clock, 500, batch_min_bytes=1024, batch_initial_bytes=1024,
                        timeout_initial_s=0.2, timeout_min_s=0.05)
    seqs = [c.seq_first for b in ul.delivered for c in b.chunks]
    assert seqs == sorted(seqs) and len(seqs) == 5
    assert up.stats()["attempts"].get(3) == 1  # the head chunk: two failures, then acked
    assert (await buf.take(1 << 20)) == []  # type: ignore[attr-defined]

    # a failed attempt is remembered by the buffer across an uploader restart
    await _fill(buf, 100, clock, Priority.CRITICAL)
    dead = FakeUplink(clock, delay_s=0.001, default="fail")
    up2 = Uploader(buf, [dead], device_id="dev-1", clock=clock,  # type: ignore[arg-type]
                   config=cfg(backoff_base_s=5, backoff_cap_s=5))
    task = asyncio.create_task(up2.run())
    await asyncio.wait_for(dead.sent_event.wait(), 5)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await buf.close()  # type: ignore[attr-defined]
    buf = await _open(path, clock)
    ul3 = FakeUplink(clock, delay_s=0.001)
    up3 = await _deliver(buf, ul3, clock, 100)
    assert up3.stats()["attempts"] == {2: 1}
    await buf.close()  # type: ignore[attr-defined]
