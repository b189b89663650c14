"""Simulated sensors as agent sources, with ground-truth counters.

Every generator is an agent :class:`~agent.sources.base.Source` (``name``, ``run(emit)``)
on the injected clock. Readings are sampled at the sensor rate but handed to the
pipeline every ``batch_s`` (as a data logger polls its sensors and forwards a block),
which keeps a simulated day cheap without changing what is stored. Each generator
counts what it produced, by priority: the ground truth the scenario reports check
delivery against.

* :class:`WeatherGen`: weather station (diurnal temperature, humidity, pressure, wind...
  quantized to the sensor resolution; reuses :class:`agent.sources.weather.WeatherStation`),
  optionally a critical alarm channel.
* :class:`IndustrialGen`: slow process channels at 1 Hz and, during machine events,
  vibration at a high rate (bursts) plus a critical alarm at each event start and end.
* :class:`FaultyGen`: wraps a generator and makes chosen sensors stuck, spiky, NaN or
  out of range (NaN is rejected by validation: counted, never silently dropped).
* :class:`CsvReplayGen`: replays a recording in the ``tests/data`` CSV format,
  time-shifted to the simulation start and looped.
"""

from __future__ import annotations

import bisect
import collections
import math
import random
from collections.abc import Iterable
from pathlib import Path

from agent.config import WeatherSource
from agent.sources.base import Emit, SourceBatch
from agent.sources.replay import CsvRows
from agent.sources.weather import WeatherStation
from pymigrate.clock import Clock
from pymigrate.types import Priority, Reading

__all__ = ["CsvReplayGen", "FaultyGen", "Generator", "IndustrialGen", "WeatherGen"]


class Generator:
    """Base: emit every ``batch_s`` the readings sampled since the last emit."""

    name = "sim"

    def __init__(self, *, device_id: str, clock: Clock, batch_s: float = 10.0) -> None:
        self.device_id = device_id
        self.clock = clock
        self.batch_s = batch_s
        self.produced = 0
        self.by_priority: collections.Counter[str] = collections.Counter()
        self.done = False  # set to stop producing (checked at each batch)
        self.finished = False  # run() has returned

    def readings_between(self, t0_ms: int, t1_ms: int) -> list[Reading]:
        """Readings sampled in ``[t0_ms, t1_ms)`` (wall ms of the device clock)."""
        raise NotImplementedError

    def count(self, readings: Iterable[Reading]) -> None:
        for r in readings:
            self.produced += 1
            self.by_priority[r.priority.name.lower()] += 1

    async def run(self, emit: Emit) -> None:
        self.finished = False
        try:
            await self._produce(emit)
        finally:
            self.finished = True

    async def _produce(self, emit: Emit) -> None:
        nxt = self.clock.monotonic()
        last_ms = self.clock.time_ms()
        while not self.done:
            nxt += self.batch_s
            await self.clock.sleep_until(nxt)
            now_ms = self.clock.time_ms()
            if now_ms < last_ms:  # the device clock stepped back: restart from it
                last_ms = now_ms - int(self.batch_s * 1000)
            out = self.readings_between(last_ms, now_ms)
            last_ms = now_ms
            if out:
                self.count(out)
                await emit(SourceBatch(out))


def _ticks(t0_ms: int, t1_ms: int, period_ms: int) -> range:
    first = -(-t0_ms // period_ms) * period_ms
    return range(first, t1_ms, period_ms)


class WeatherGen(Generator):
    """A weather station: ``sensors`` channels every ``interval_s``; ``alarm_every_s``
    adds a critical ``alarm`` reading that often (e.g. a lightning or frost alarm)."""

    name = "weather-sim"

    def __init__(self, *, device_id: str, clock: Clock, sensors: int = 10,
                 interval_s: float = 1.0, seed: int = 1, resolution: float = 0.1,
                 batch_s: float = 10.0, alarm_every_s: float = 0.0,
                 low: tuple[str, ...] = ()) -> None:
        super().__init__(device_id=device_id, clock=clock, batch_s=batch_s)
        self.low = low  # sensor-name prefixes sent at LOW priority
        self.station = WeatherStation(
            WeatherSource(sensors=sensors, interval_s=interval_s, seed=seed,
                          resolution=resolution), device_id=device_id, clock=clock)
        self.period_ms = max(1, round(interval_s * 1000))
        self.alarm_ms = round(alarm_every_s * 1000)

    def readings_between(self, t0_ms: int, t1_ms: int) -> list[Reading]:
        out: list[Reading] = []
        for ts in _ticks(t0_ms, t1_ms, self.period_ms):
            rs = self.station.sample(ts)
            if self.low:
                rs = [Reading(r.device_id, r.sensor, r.ts_ms, r.value, Priority.LOW)
                      if r.sensor.startswith(self.low) else r for r in rs]
            out.extend(rs)
        if self.alarm_ms:
            out.extend(Reading(self.device_id, "alarm", ts, 1.0, Priority.CRITICAL)
                       for ts in _ticks(t0_ms, t1_ms, self.alarm_ms))
        return out


class IndustrialGen(Generator):
    """A machine: ``temp``/``current``/``pressure`` at 1 Hz (normal), and during machine
    events (Poisson, mean gap ``event_every_s``, ``event_s`` long) ``vibration`` at
    ``burst_hz`` (low priority: bulky, nice to have) with a critical ``alarm`` reading at
    each event's start (1) and end (0)."""

    name = "industrial-sim"

    def __init__(self, *, device_id: str, clock: Clock, seed: int = 1,
                 event_every_s: float = 1800.0, event_s: float = 60.0,
                 burst_hz: float = 100.0, batch_s: float = 10.0) -> None:
        super().__init__(device_id=device_id, clock=clock, batch_s=batch_s)
        self.rng = random.Random(seed)
        self.event_every_s = event_every_s
        self.event_s = event_s
        self.burst_period_ms = max(1, round(1000 / burst_hz))
        self._next_event_ms = clock.time_ms() + self._gap_ms()
        self.events: list[tuple[int, int]] = []  # (start_ms, end_ms) of machine events

    def _gap_ms(self) -> int:
        return round(self.rng.expovariate(1.0 / self.event_every_s) * 1000)

    def _event_windows(self, t1_ms: int) -> None:
        while self._next_event_ms < t1_ms:
            start = self._next_event_ms
            self.events.append((start, start + round(self.event_s * 1000)))
            self._next_event_ms = start + round(self.event_s * 1000) + self._gap_ms()

    def readings_between(self, t0_ms: int, t1_ms: int) -> list[Reading]:
        self._event_windows(t1_ms)
        dev = self.device_id
        out: list[Reading] = []
        for ts in _ticks(t0_ms, t1_ms, 1000):
            phase = ts / 60_000.0
            out.append(Reading(dev, "temp", ts, round(60 + 5 * math.sin(phase), 2)))
            out.append(Reading(dev, "current", ts, round(12 + self.rng.gauss(0, 0.2), 2)))
            out.append(Reading(dev, "pressure", ts, round(4.0 + 0.1 * math.cos(phase), 3)))
        for start, end in self.events:
            if end <= t0_ms or start >= t1_ms:
                continue
            if t0_ms <= start < t1_ms:
                out.append(Reading(dev, "alarm", start, 1.0, Priority.CRITICAL))
            if t0_ms <= end < t1_ms:
                out.append(Reading(dev, "alarm", end, 0.0, Priority.CRITICAL))
            lo, hi = max(start, t0_ms), min(end, t1_ms)
            out.extend(Reading(dev, "vibration", ts,
                               round(2.0 * math.sin(ts / 7.0) + self.rng.gauss(0, 0.3), 3),
                               Priority.LOW)
                       for ts in _ticks(lo, hi, self.burst_period_ms))
        return out


class FaultyGen(Generator):
    """Wraps ``inner`` and injects faults into the sensors named in ``faults``:
    ``stuck`` (repeats its first value), ``spike`` (x20 with probability 0.01),
    ``nan`` (NaN with probability 0.05), ``range`` (values outside the physical range)."""

    KINDS = ("stuck", "spike", "nan", "range")

    def __init__(self, inner: Generator, faults: dict[str, str], *, seed: int = 1) -> None:
        super().__init__(device_id=inner.device_id, clock=inner.clock, batch_s=inner.batch_s)
        for sensor, kind in faults.items():
            if kind not in self.KINDS:
                raise ValueError(f"unknown fault {kind!r} for {sensor!r}")
        self.inner = inner
        self.faults = dict(faults)
        self.rng = random.Random(seed)
        self._stuck: dict[str, float] = {}
        self.injected: collections.Counter[str] = collections.Counter()
        self.name = f"faulty-{inner.name}"

    def _fault(self, r: Reading, kind: str) -> Reading:
        v = r.value
        if kind == "stuck":
            v = self._stuck.setdefault(r.sensor, v)
        elif kind == "spike" and self.rng.random() < 0.01:
            v = v * 20 + 100
        elif kind == "nan" and self.rng.random() < 0.05:
            v = math.nan
        elif kind == "range":
            v = -9999.0 if self.rng.random() < 0.5 else 1e9
        else:
            return r
        self.injected[kind] += 1
        return Reading(r.device_id, r.sensor, r.ts_ms, v, r.priority)

    def readings_between(self, t0_ms: int, t1_ms: int) -> list[Reading]:
        out = self.inner.readings_between(t0_ms, t1_ms)
        return [self._fault(r, self.faults[r.sensor]) if r.sensor in self.faults else r
                for r in out]


class CsvReplayGen(Generator):
    """Replays a CSV recording on the simulation clock: the first row lands at the
    generator's start time, rows keep their spacing, and the file loops (each pass
    shifted by the recording's span) so a short recording can feed a long run."""

    name = "replay-sim"

    def __init__(self, path: str | Path, *, device_id: str, clock: Clock,
                 batch_s: float = 60.0, loop: bool = True,
                 priority: Priority = Priority.NORMAL) -> None:
        super().__init__(device_id=device_id, clock=clock, batch_s=batch_s)
        rows = [(ts, vals) for ts, vals, _ in CsvRows(path) if ts is not None]
        if not rows:
            raise ValueError(f"{path}: no rows with a timestamp")
        t0 = rows[0][0]
        # recordings are not always in order (clock corrections): replay in time order
        self.rows = sorted(((ts - t0, vals) for ts, vals in rows), key=lambda r: r[0])
        if self.rows[0][0] < 0:
            shift = -self.rows[0][0]
            self.rows = [(off + shift, vals) for off, vals in self.rows]
        step = max(1, (self.rows[-1][0] - self.rows[0][0]) // max(1, len(self.rows) - 1))
        self.span_ms = self.rows[-1][0] + max(step, 1)
        self._offsets = [off for off, _ in self.rows]
        self.loop = loop
        self.priority = priority
        self.start_ms = clock.time_ms()

    def readings_between(self, t0_ms: int, t1_ms: int) -> list[Reading]:
        out: list[Reading] = []
        lo, hi = t0_ms - self.start_ms, t1_ms - self.start_ms
        if hi <= 0:
            return out
        lo = max(lo, 0)
        first_pass, last_pass = lo // self.span_ms, (hi - 1) // self.span_ms
        if not self.loop:
            last_pass = min(last_pass, 0)
        for k in range(first_pass, last_pass + 1):
            base = k * self.span_ms
            i = bisect.bisect_left(self._offsets, lo - base)
            j = bisect.bisect_left(self._offsets, hi - base)
            for off, vals in self.rows[i:j]:
                ts = self.start_ms + base + off
                out.extend(Reading(self.device_id, name, ts, v, self.priority)
                           for name, v in vals)
        return out
