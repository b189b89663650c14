"""Helpers shared by the durable-buffer unit tests."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from agent.buffer import BufferConfig, DurableBuffer
from pymigrate.clock import VirtualClock
from pymigrate.types import Priority, Reading

T = TypeVar("T")


def readings(n: int, *, device: str = "dev-1", priority: Priority = Priority.NORMAL,
             start_ms: int = 1_767_225_600_000, noisy: bool = False,
             sensors: int = 10, seed: int = 0) -> list[Reading]:
    """``n`` readings of ``sensors`` sensors at 1 Hz; ``noisy`` makes values incompressible."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        v = rnd.random() * 1e6 if noisy else round(20 + (i % 17) * 0.1, 1)
        out.append(Reading(device_id=device, sensor=f"s{i % sensors}",
                           ts_ms=start_ms + (i // sensors) * 1000, value=v, priority=priority))
    return out


class Events:
    """Records ``on_event`` calls."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, name: str, data: dict[str, Any]) -> None:
        self.seen.append((name, data))

    def named(self, name: str) -> list[dict[str, Any]]:
        return [d for n, d in self.seen if n == name]


def config(path: Path, **kw: Any) -> BufferConfig:
    kw.setdefault("commit_window_ms", 0)
    return BufferConfig(path=str(path), **kw)


@asynccontextmanager
async def opened(path: Path, *, clock: VirtualClock | None = None,
                 events: Events | None = None,
                 degrader: Callable[[list[Reading]], list[Reading]] | None = None,
                 **kw: Any) -> AsyncIterator[DurableBuffer]:
    buf = DurableBuffer(config(path, **kw), clock=clock or VirtualClock(), on_event=events,
                        degrader=degrader)
    await buf.open()
    try:
        yield buf
    finally:
        await buf.close()


async def crash(buf: DurableBuffer) -> None:
    """Simulate a hard kill: stop the tasks and drop the connection without flushing."""
    for t in buf._tasks:
        t.cancel()
    await asyncio.gather(*buf._tasks, return_exceptions=True)
    buf._tasks = []
    db, buf._db = buf._db, None
    assert db is not None
    await db.close()


async def within(aw: Awaitable[T], limit: float = 5.0) -> T:
    return await asyncio.wait_for(aw, limit)


async def drain(buf: DurableBuffer, *, ack: bool = True) -> list[Reading]:
    """Flush, then take everything pending (acking it), decoded, in take order."""
    from agent.codec import open_chunk

    await buf.flush()
    out: list[Reading] = []
    while True:
        got = await buf.take(1 << 30, max_chunks=256)
        if not got:
            return out
        for sc in got:
            out.extend(open_chunk(sc.chunk))
        if ack:
            await buf.ack([sc.id for sc in got])


async def eventually(pred: Callable[[], bool], limit: float = 5.0) -> None:
    """Wait (real time) until ``pred()``: the buffer's SQLite work runs in a thread, so
    virtual-time wake-ups complete a little later in real time."""
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    while not pred():
        if loop.time() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)
