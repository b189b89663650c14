"""Simulated sensors: rates, priorities, bursts, faults and CSV replay on virtual time."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from agent.sources.base import SourceBatch
from pymigrate.clock import VirtualClock
from pymigrate.types import Priority
from simulators.device import DeviceClock
from simulators.sensors import CsvReplayGen, FaultyGen, IndustrialGen, WeatherGen

DATA = Path(__file__).parent.parent / "data"


async def collect(gen, clock: VirtualClock, seconds: float) -> list[SourceBatch]:  # type: ignore[no-untyped-def]
    import asyncio

    out: list[SourceBatch] = []

    async def emit(b: SourceBatch) -> None:
        out.append(b)

    task = asyncio.create_task(gen.run(emit))
    await clock.advance(seconds)
    gen.done = True
    await clock.advance(gen.batch_s)
    await task
    assert gen.finished
    return out


async def test_weather_rate_priorities_and_resolution() -> None:
    clock = VirtualClock()
    gen = WeatherGen(device_id="d", clock=clock, sensors=10, interval_s=1.0, batch_s=10,
                     alarm_every_s=30, low=("wind",))
    batches = await collect(gen, clock, 60)
    rs = [r for b in batches for r in b.readings]
    assert gen.produced == len(rs)
    # 70 s of samples (60 s + the last batch) at 10 sensors x 1 Hz plus alarms
    assert sum(1 for r in rs if r.sensor != "alarm") == 700
    assert gen.by_priority["critical"] == sum(1 for r in rs if r.sensor == "alarm") >= 2
    assert {r.priority for r in rs if r.sensor.startswith("wind")} == {Priority.LOW}
    temps = [r.value for r in rs if r.sensor == "temperature"]
    assert all(abs(v * 10 - round(v * 10)) < 1e-6 for v in temps)  # 0.1 resolution
    assert len({r.ts_ms for r in rs if r.sensor == "temperature"}) == 70  # no repeats


async def test_weather_restarts_after_clock_steps_back() -> None:
    base = VirtualClock()
    clock = DeviceClock(base)
    gen = WeatherGen(device_id="d", clock=clock, sensors=1, batch_s=10)
    import asyncio

    got: list[SourceBatch] = []

    async def emit(b: SourceBatch) -> None:
        got.append(b)

    task = asyncio.create_task(gen.run(emit))
    await base.advance(20)
    clock.jump_to(0)  # RTC reset to 1970
    await base.advance(20)
    gen.done = True
    await base.advance(10)
    await task
    assert got[-1].readings[0].ts_ms < 100_000  # continues from the new (wrong) time
    assert all(b.readings for b in got)


async def test_industrial_bursts_and_alarms() -> None:
    clock = VirtualClock()
    gen = IndustrialGen(device_id="m", clock=clock, seed=3, event_every_s=120, event_s=30,
                        burst_hz=50, batch_s=10)
    batches = await collect(gen, clock, 1200)
    rs = [r for b in batches for r in b.readings]
    assert gen.events
    vib = [r for r in rs if r.sensor == "vibration"]
    alarms = [r for r in rs if r.sensor == "alarm"]
    assert all(r.priority is Priority.LOW for r in vib)
    assert all(r.priority is Priority.CRITICAL for r in alarms)
    # every vibration reading lies inside a machine event, at 50 Hz
    for r in vib[:500]:
        assert any(a <= r.ts_ms < b for a, b in gen.events)
    closed = [e for e in gen.events if e[1] <= clock.time_ms() - 10_000]
    assert sum(1 for r in alarms if r.value == 1.0) >= len(closed)
    assert len(vib) >= len(closed) * 30 * 50 * 0.9
    assert sum(1 for r in rs if r.sensor == "temp") >= 1200


async def test_faulty_sensors() -> None:
    clock = VirtualClock()
    inner = WeatherGen(device_id="d", clock=clock, sensors=10, batch_s=10, seed=5)
    gen = FaultyGen(inner, {"temperature": "stuck", "humidity": "nan", "pressure": "range",
                            "wind_speed": "spike"}, seed=2)
    batches = await collect(gen, clock, 600)
    rs = [r for b in batches for r in b.readings]
    assert len({r.value for r in rs if r.sensor == "temperature"}) == 1
    assert any(math.isnan(r.value) for r in rs if r.sensor == "humidity")
    assert all(r.value in (-9999.0, 1e9) for r in rs if r.sensor == "pressure")
    assert gen.injected["stuck"] > 0 and gen.injected["nan"] > 0
    assert gen.injected["range"] > 0
    with pytest.raises(ValueError):
        FaultyGen(inner, {"x": "melted"})


async def test_csv_replay_shifted_and_looped(tmp_path: Path) -> None:
    clock = VirtualClock()
    # a day of the real recording (the whole file spans half a year: minutes to loop)
    path = tmp_path / "cgm_day.csv"
    path.write_text("".join((DATA / "cgm_5min.csv").read_text().splitlines(True)[:289]))
    gen = CsvReplayGen(path, device_id="p", clock=clock, batch_s=600)
    span_h = gen.span_ms / 3_600_000
    batches = await collect(gen, clock, (span_h * 2 + 1) * 3600)
    rs = [r for b in batches for r in b.readings]
    assert rs[0].ts_ms >= clock.time_ms() - (span_h * 2 + 1) * 3_600_000 - 600_000
    per_pass = sum(len(v) for _, v in gen.rows)
    assert len(rs) >= 2 * per_pass  # looped at least twice
    ts = [r.ts_ms for r in rs if r.sensor == rs[0].sensor]
    assert ts == sorted(ts)  # replayed in time order, passes one after another
    once = CsvReplayGen(path, device_id="p", clock=VirtualClock(), batch_s=600, loop=False)
    assert once.readings_between(once.start_ms - 1000, once.start_ms) == []
    assert len(once.readings_between(once.start_ms, once.start_ms + 10 * once.span_ms)) \
        == per_pass


def test_csv_replay_needs_rows(tmp_path: Path) -> None:
    p = tmp_path / "empty.csv"
    p.write_text("time,a\nnot-a-time,1\n")
    with pytest.raises(ValueError):
        CsvReplayGen(p, device_id="x", clock=VirtualClock())
