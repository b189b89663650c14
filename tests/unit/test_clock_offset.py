"""The test clock hook: ``PYMIGRATE_CLOCK_OFFSET_MS`` shifts wall time, not monotonic time."""

from __future__ import annotations

import pytest

from pymigrate.clock import OffsetClock, VirtualClock, WallClock, clock_from_env


async def test_offset_clock_shifts_wall_time_only() -> None:
    base = VirtualClock(start_ms=1_000_000)
    c = OffsetClock(base, -3_600_000)
    assert c.time_ms() == 1_000_000 - 3_600_000
    assert c.monotonic() == base.monotonic()
    await c.sleep(0)
    await c.sleep_until(0.0)
    c.offset_ms = 5
    assert c.time_ms() == 1_000_005


def test_clock_from_env() -> None:
    assert isinstance(clock_from_env({}), WallClock)
    c = clock_from_env({"PYMIGRATE_CLOCK_OFFSET_MS": "120000"})
    assert isinstance(c, OffsetClock) and c.offset_ms == 120_000
    with pytest.raises(ValueError, match="PYMIGRATE_CLOCK_OFFSET_MS"):
        clock_from_env({"PYMIGRATE_CLOCK_OFFSET_MS": "soon"})
