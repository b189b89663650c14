"""Simulated weather station: diurnal temperature, humidity, pressure, wind, solar, rain,
battery... quantized to the sensor resolution. Deterministic for a seed."""

from __future__ import annotations

import math
import random

from agent.config import WeatherSource
from agent.sources.base import Emit, SourceBatch
from pymigrate.clock import Clock
from pymigrate.types import Priority, Reading

_DAY_S = 86_400.0

# name, mean, diurnal amplitude, noise, phase (fraction of day of the peak)
CHANNELS: list[tuple[str, float, float, float, float]] = [
    ("temperature", 12.0, 6.0, 0.05, 0.6),
    ("humidity", 65.0, -15.0, 0.2, 0.6),
    ("pressure", 1013.0, 1.2, 0.02, 0.4),
    ("wind_speed", 4.0, 2.0, 0.4, 0.55),
    ("wind_dir", 220.0, 20.0, 3.0, 0.5),
    ("solar", 250.0, 250.0, 2.0, 0.5),
    ("rain", 0.0, 0.0, 0.0, 0.0),
    ("battery", 12.6, 0.3, 0.005, 0.55),
    ("soil_temp", 10.0, 2.0, 0.02, 0.7),
    ("dew_point", 5.0, 2.0, 0.05, 0.6),
]


_NON_NEGATIVE = ("wind_speed", "solar")


class WeatherStation:
    """Emits one reading per sensor every ``interval_s`` on the injected clock."""

    name = "weather"

    def __init__(self, cfg: WeatherSource, *, device_id: str, clock: Clock,
                 max_ticks: int | None = None) -> None:
        self.cfg = cfg
        self.device_id = device_id
        self.clock = clock
        self.max_ticks = max_ticks
        self._rng = random.Random(cfg.seed)
        self._walk = [0.0] * cfg.sensors
        self.ticks = 0

    def _channel(self, i: int) -> tuple[str, float, float, float, float]:
        base = CHANNELS[i % len(CHANNELS)]
        if i < len(CHANNELS):
            return base
        return (f"{base[0]}_{i // len(CHANNELS)}", *base[1:])

    def sample(self, ts_ms: int) -> list[Reading]:
        """One reading per sensor at ``ts_ms``."""
        q = self.cfg.resolution
        day_frac = (ts_ms / 1000.0 % _DAY_S) / _DAY_S
        out = []
        for i in range(self.cfg.sensors):
            name, mean, amp, noise, phase = self._channel(i)
            self._walk[i] = 0.999 * self._walk[i] + self._rng.gauss(0.0, noise)
            if name.startswith("rain"):
                v = max(0.0, self._rng.random() - 0.995) * 40.0
            else:
                v = mean + amp * math.cos(2 * math.pi * (day_frac - phase)) + self._walk[i]
                if name.startswith(_NON_NEGATIVE):  # a speed or irradiance is never < 0
                    v = max(0.0, v)
                elif name.startswith("humidity"):
                    v = min(100.0, max(0.0, v))
                elif name.startswith("wind_dir"):
                    v %= 360.0
            v = round(round(v / q) * q, 6) if q > 0 else v
            prio = Priority.NORMAL
            if (self.cfg.alarm_threshold is not None and name == "temperature"
                    and v > self.cfg.alarm_threshold):
                prio = Priority.CRITICAL
            out.append(Reading(device_id=self.device_id, sensor=name, ts_ms=ts_ms, value=v,
                               priority=prio))
        return out

    async def run(self, emit: Emit) -> None:
        period = self.cfg.interval_s
        nxt = self.clock.monotonic()
        while self.max_ticks is None or self.ticks < self.max_ticks:
            await self.clock.sleep_until(nxt)
            await emit(SourceBatch(self.sample(self.clock.time_ms()), sampled=True))
            self.ticks += 1
            nxt += period
            now = self.clock.monotonic()
            if nxt < now - period:  # fell behind (suspended): skip, do not burst
                nxt = now
