"""The injected clocks: virtual time wakes sleepers in deadline order, wall time is real."""

from __future__ import annotations

import asyncio

from pymigrate.clock import Clock, VirtualClock, WallClock


async def test_virtual_clock_wakes_in_order() -> None:
    clock = VirtualClock(start_ms=1_000_000, wall_offset_ms=-500)
    woke: list[tuple[str, float]] = []

    async def sleeper(name: str, s: float) -> None:
        await clock.sleep(s)
        woke.append((name, clock.monotonic()))

    tasks = [asyncio.create_task(sleeper(n, s)) for n, s in (("b", 20), ("a", 10), ("c", 30))]
    await clock.advance(25)
    assert woke == [("a", 10), ("b", 20)]
    assert clock.monotonic() == 25
    assert clock.time_ms() == 1_000_000 + 25_000 - 500
    assert clock.true_time_ms() == 1_025_000
    assert clock.next_deadline() == 30
    await clock.advance(10)
    await asyncio.gather(*tasks)
    assert woke[-1] == ("c", 30)
    assert clock.next_deadline() is None
    assert isinstance(clock, Clock)


async def test_virtual_sleep_until_past_returns_at_once() -> None:
    clock = VirtualClock()
    await clock.advance(5)
    await asyncio.wait_for(clock.sleep_until(1.0), 1)
    await asyncio.wait_for(clock.sleep(0), 1)


async def test_run_until_predicate() -> None:
    clock = VirtualClock()
    done = asyncio.Event()

    async def worker() -> None:
        await clock.sleep(100)
        done.set()

    t = asyncio.create_task(worker())
    assert await clock.run_until(done.is_set, max_seconds=1000)
    assert clock.monotonic() == 100
    never = asyncio.Event()
    assert not await clock.run_until(never.is_set, max_seconds=50, step=20)
    assert clock.monotonic() == 150
    await t


async def test_cancelled_sleeper_is_skipped() -> None:
    clock = VirtualClock()
    t = asyncio.create_task(clock.sleep(5))
    await clock.settle()
    t.cancel()
    await asyncio.gather(t, return_exceptions=True)
    assert clock.next_deadline() is None


async def test_wall_clock() -> None:
    c = WallClock()
    m0, t0 = c.monotonic(), c.time_ms()
    await c.sleep(0.01)
    await c.sleep_until(c.monotonic() + 0.01)
    assert c.monotonic() - m0 >= 0.02
    assert c.time_ms() >= t0 + 15
