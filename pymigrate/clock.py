"""Injected clocks: everything that sleeps or reads the time takes a :class:`Clock`.

``WallClock`` is production; ``VirtualClock`` runs simulations and tests on virtual time.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Protocol, runtime_checkable


@runtime_checkable
class Clock(Protocol):
    """Time source and sleeper."""

    def time_ms(self) -> int:
        """Wall time, integer milliseconds since the Unix epoch (UTC)."""

    def monotonic(self) -> float:
        """Monotonic seconds, only meaningful as differences."""

    async def sleep(self, seconds: float) -> None:
        """Sleep for ``seconds`` of this clock's time."""

    async def sleep_until(self, deadline: float) -> None:
        """Sleep until ``monotonic() >= deadline``."""


_BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"


class WallClock:
    """The real clock."""

    _boot: str | None = None

    def boot_id(self) -> str | None:
        """What makes ``monotonic()`` comparable across processes: the kernel's boot id
        (CLOCK_MONOTONIC counts from boot, the same for every process of one boot);
        None where the system does not say."""
        if WallClock._boot is None:
            try:
                with open(_BOOT_ID_FILE, encoding="ascii") as f:
                    WallClock._boot = f.read().strip()
            except OSError:
                WallClock._boot = ""
        return WallClock._boot or None

    def time_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    async def sleep_until(self, deadline: float) -> None:
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))


class VirtualClock:
    """Virtual time: sleepers wake only when the driver advances the clock.

    ``advance(dt)`` moves time forward, waking sleepers in deadline order and letting
    the event loop run between wake-ups, so a day of a device runs in milliseconds.
    ``wall_offset_ms`` lets a simulated device's wall clock disagree with true time.
    """

    def __init__(self, start_ms: int = 1_767_225_600_000, *, wall_offset_ms: int = 0) -> None:
        self._start_ms = start_ms
        self._now = 0.0  # monotonic seconds
        self.wall_offset_ms = wall_offset_ms
        self._heap: list[tuple[float, int, asyncio.Future[None]]] = []
        self._ids = itertools.count()
        self._boot = f"virtual-{id(self):x}-{start_ms}"

    def boot_id(self) -> str:
        """One "boot" per virtual clock: its monotonic time is shared by whatever runs on
        it (an agent restarted on the same VirtualClock is a process restart, not a
        reboot)."""
        return self._boot

    def time_ms(self) -> int:
        return self._start_ms + round(self._now * 1000) + self.wall_offset_ms

    def true_time_ms(self) -> int:
        """True (simulation) time without this device's wall offset."""
        return self._start_ms + round(self._now * 1000)

    def monotonic(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        await self.sleep_until(self._now + max(0.0, seconds))

    async def sleep_until(self, deadline: float) -> None:
        if deadline <= self._now:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (deadline, next(self._ids), fut))
        await fut

    def next_deadline(self) -> float | None:
        """The earliest pending sleeper's deadline, or None."""
        while self._heap and self._heap[0][2].done():
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    async def settle(self, rounds: int = 5) -> None:
        """Let ready tasks run (several loop iterations) without moving time."""
        for _ in range(rounds):
            await asyncio.sleep(0)

    async def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, waking every sleeper due on the way."""
        target = self._now + max(0.0, seconds)
        await self.settle()
        while True:
            nxt = self.next_deadline()
            if nxt is None or nxt > target:
                break
            self._now = max(self._now, nxt)
            while self._heap and self._heap[0][0] <= self._now:
                _, _, fut = heapq.heappop(self._heap)
                if not fut.done():
                    fut.set_result(None)
            await self.settle()
        self._now = target
        await self.settle()

    async def run_until(self, predicate: object, *, max_seconds: float,
                        step: float = 3600.0) -> bool:
        """Advance until ``predicate()`` is true or ``max_seconds`` pass; returns the predicate."""
        assert callable(predicate)
        end = self._now + max_seconds
        await self.settle()
        while not predicate():
            if self._now >= end:
                return False
            nxt = self.next_deadline()
            limit = end - self._now
            dt = min(step, limit) if nxt is None else min(nxt - self._now, limit)
            await self.advance(max(dt, 0.0))
        return True


class OffsetClock:
    """Another clock's wall time shifted by ``offset_ms`` (monotonic time untouched).

    For fault injection: a device whose RTC is wrong or jumped. ``pymigrate agent``
    wraps its WallClock in one when ``PYMIGRATE_CLOCK_OFFSET_MS`` is set (test hook).
    """

    def __init__(self, base: Clock, offset_ms: int) -> None:
        self.base = base
        self.offset_ms = offset_ms

    def time_ms(self) -> int:
        return self.base.time_ms() + self.offset_ms

    def monotonic(self) -> float:
        return self.base.monotonic()

    def boot_id(self) -> str | None:
        return boot_id_of(self.base)

    async def sleep(self, seconds: float) -> None:
        await self.base.sleep(seconds)

    async def sleep_until(self, deadline: float) -> None:
        await self.base.sleep_until(deadline)


def boot_id_of(clock: object) -> str | None:
    """The boot id of ``clock`` (see :meth:`WallClock.boot_id`), None when it has none:
    then monotonic times of two processes are not comparable."""
    get = getattr(clock, "boot_id", None)
    return get() if callable(get) else None


def clock_from_env(env: dict[str, str] | None = None) -> Clock:
    """WallClock, offset by ``PYMIGRATE_CLOCK_OFFSET_MS`` when that is set (test hook)."""
    import os

    raw = (os.environ if env is None else env).get("PYMIGRATE_CLOCK_OFFSET_MS", "").strip()
    if not raw:
        return WallClock()
    try:
        return OffsetClock(WallClock(), int(raw))
    except ValueError:
        raise ValueError(f"PYMIGRATE_CLOCK_OFFSET_MS must be an integer, got {raw!r}") from None
