"""``clock-failures``: devices whose real-time clocks misbehave: one drifts (+200 ppm and
starts 5 minutes fast), one's RTC resets to 1970 mid-run (a dead RTC battery after a
brown-out), one steps back an hour (a bad NTP answer). Each device also reports a
``gps_time`` channel whose value is the true time, so the report measures how far the
stored (corrected) timestamps are from the truth."""

from __future__ import annotations

from typing import Any

from pymigrate.types import Reading
from simulators.device import DeviceClock
from simulators.fleet import START_MS, DeviceSpec, Fleet, Group
from simulators.report import Report, weighted_percentiles
from simulators.scenarios import Options, base_checks
from simulators.sensors import Generator, WeatherGen

NAME = "clock-failures"
SUMMARY = "RTC drift, reset to 1970 and a step back; timestamps corrected from acks"
DEFAULTS = {"devices": 3, "hours": 12}
SHORT = {"devices": 3, "hours": 2}


class TruthGen(Generator):
    """``gps_time`` every 10 s: value = true seconds since the simulation start."""

    name = "gps-sim"

    def readings_between(self, t0_ms: int, t1_ms: int) -> list[Reading]:
        clock = self.clock
        assert isinstance(clock, DeviceClock)
        true_ms = clock.true_time_ms()
        off = t1_ms - true_ms  # device wall minus true, right now
        first = -(-t0_ms // 10_000) * 10_000
        return [Reading(self.device_id, "gps_time", ts, (ts - off - START_MS) / 1000.0)
                for ts in range(first, t1_ms, 10_000)]


async def run(opts: Options) -> Report:
    devices, hours = opts.resolved(DEFAULTS)
    groups = [Group("field", devices, loss=0.01, latency_s=0.08, jitter_s=0.04)]

    def gens(dev: str, clock: Any, n: int) -> list[Generator]:
        return [WeatherGen(device_id=dev, clock=clock, seed=opts.seed * 1000 + n, sensors=4,
                           interval_s=5.0, batch_s=60.0),
                TruthGen(device_id=dev, clock=clock, batch_s=60.0)]

    fleet = Fleet(name=NAME, groups=groups, gens=gens, spec=DeviceSpec(), seed=opts.seed,
                  root=opts.root, memory=opts.memory, progress=opts.progress, sample_s=300)
    faults: dict[str, str] = {}

    async def drift(f: Fleet) -> None:
        d = f.devices[0]
        d.clock.drift_ppm, d.clock.offset_ms = 200.0, 300_000
        faults[d.id] = "drift +200 ppm, +5 min"

    async def reset(f: Fleet) -> None:
        if len(f.devices) > 1:
            f.devices[1].clock.jump_to(0)
            faults[f.devices[1].id] = f"RTC reset to 1970 at {hours / 3:g} h"

    async def step_back(f: Fleet) -> None:
        if len(f.devices) > 2:
            d = f.devices[2]
            d.clock.jump_to(d.clock.time_ms() - 3_600_000)
            faults[d.id] = f"step back 1 h at {hours / 2:g} h"

    fleet.at(0.0, drift)
    fleet.at(hours / 3, reset)
    fleet.at(hours / 2, step_back)
    errors: list[tuple[float, int]] = []

    async def inspect(f: Fleet) -> None:
        for d in f.devices:
            for r in await f.cloud.store.query(d.id, "gps_time"):
                errors.append((abs(r.ts_ms - (START_MS + r.value * 1000)) / 1000.0, 1))

    try:
        rep = await fleet.run(hours, drain_hours=4, inspect=inspect)
    finally:
        fleet.close()
    within = sum(1 for e, _ in errors if e <= 1.0)
    total = len(errors)
    rep.extra["faults"] = faults
    rep.extra["time_error_s"] = weighted_percentiles(errors)
    rep.extra["stamped_within_1s_pct"] = round(100.0 * within / max(total, 1), 2)
    return rep


def check(rep: Report) -> list[str]:
    bad = base_checks(rep)
    if rep.extra.get("stamped_within_1s_pct", 0) < 50:
        bad.append(f"only {rep.extra.get('stamped_within_1s_pct')} % of readings within 1 s")
    return bad
