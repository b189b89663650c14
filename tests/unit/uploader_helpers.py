"""Shared builders for the uploader/retry tests."""

from __future__ import annotations

import asyncio
import random
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from agent.retry import RetryConfig
from agent.uploader import Uploader
from pymigrate.clock import VirtualClock
from pymigrate.types import Chunk, Priority
from tests.unit.fakes_buffer import FakeBuffer
from tests.unit.fakes_uplink import FakeUplink

DEV = "dev-1"


def chunk(seq: int, *, priority: Priority = Priority.NORMAL, nbytes: int = 200,
          count: int = 10, device: str = DEV) -> Chunk:
    # incompressible, like a real (already compressed) chunk payload
    payload = random.Random(seq).randbytes(nbytes)
    return Chunk(device, priority, seq, seq + count - 1, count, seq * 1000,
                 (seq + count) * 1000, 1, payload, zlib.crc32(payload))


def cfg(**kw: object) -> RetryConfig:
    base: dict[str, object] = {"seed": 7}
    base.update(kw)
    return RetryConfig(**base)  # type: ignore[arg-type]


@asynccontextmanager
async def running(up: Uploader) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(up.run(), name="test[uploader]")
    try:
        yield task
    finally:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass


def make(n_chunks: int = 0, *, uplinks: int = 1, config: RetryConfig | None = None,
         **upkw: object) -> tuple[VirtualClock, FakeBuffer, list[FakeUplink], Uploader]:
    clock = VirtualClock()
    buf = FakeBuffer(clock)
    ups = [FakeUplink(clock, name=f"up{i}") for i in range(uplinks)]
    for s in range(n_chunks):
        buf.put_nowait(chunk(1 + 10 * s))
    up = Uploader(buf, ups, device_id=DEV, clock=clock, config=config or cfg(), **upkw)  # type: ignore[arg-type]
    return clock, buf, ups, up


async def advance(clock: VirtualClock, seconds: float, *, rounds: int = 40) -> None:
    """Move virtual time forward, letting every woken task run to its next sleep.

    ``VirtualClock.advance`` settles only a few loop iterations between wake-ups; the
    uploader hops through a few more (races, take, spawn), so settle generously.
    """
    target = clock.monotonic() + seconds
    while True:
        await clock.settle(rounds)
        nxt = clock.next_deadline()
        if nxt is None or nxt > target:
            break
        await clock.advance(max(0.0, nxt - clock.monotonic()))
    await clock.advance(max(0.0, target - clock.monotonic()))
    await clock.settle(rounds)
