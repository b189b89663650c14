"""Replay a CSV dataset: first column a timestamp (ISO 8601, epoch seconds or epoch
milliseconds), every other column a numeric sensor; an empty cell is a missing reading.

Non-numeric cells and unparseable timestamps are rejected with a counted reason.
``speed=0`` replays as fast as the pipeline accepts (backpressure); ``speed=1`` real time.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from agent.config import ReplaySource
from agent.sources.base import Emit, SourceBatch
from pymigrate.clock import Clock
from pymigrate.errors import ConfigError
from pymigrate.types import Reading

_EPOCH_MS_THRESHOLD = 100_000_000_000  # numbers above this are milliseconds


def parse_timestamp(text: str) -> int:
    """ISO 8601 (``Z`` or offset; naive = UTC), epoch seconds or epoch ms -> int ms UTC."""
    s = text.strip()
    if not s:
        raise ValueError("empty timestamp")
    try:
        num = float(s)
    except ValueError:
        iso = s[:-1] + "+00:00" if s.endswith(("Z", "z")) else s
        dt = datetime.fromisoformat(iso)
        if dt.tzinfo is None:
            from datetime import UTC

            dt = dt.replace(tzinfo=UTC)
        return round(dt.timestamp() * 1000)
    if not math.isfinite(num):
        raise ValueError(f"non-finite timestamp {s!r}")
    return round(num if abs(num) >= _EPOCH_MS_THRESHOLD else num * 1000)


class CsvRows:
    """Iterates (ts_ms, [(sensor, value)], rejects) over a replay-format CSV."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError("sources.path", f"replay file not found: {self.path}")

    def __iter__(self) -> Iterator[tuple[int | None, list[tuple[str, float]],
                                         list[tuple[str, str]]]]:
        with self.path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if not header or len(header) < 2:
                raise ConfigError("sources.path", f"{self.path}: needs a timestamp column "
                                  "and at least one sensor column")
            sensors = [h.strip() for h in header[1:]]
            for lineno, row in enumerate(reader, start=2):
                if not row:
                    continue
                rejects: list[tuple[str, str]] = []
                try:
                    ts = parse_timestamp(row[0])
                except ValueError:
                    yield None, [], [("bad_timestamp", f"{self.path.name}:{lineno}")]
                    continue
                vals: list[tuple[str, float]] = []
                for name, cell in zip(sensors, row[1:]):
                    cell = cell.strip()
                    if not cell:
                        continue  # missing reading, not an error
                    try:
                        vals.append((name, float(cell)))
                    except ValueError:
                        rejects.append(("non_numeric", f"{self.path.name}:{lineno}:{name}"))
                yield ts, vals, rejects


class CsvReplay:
    """Replays a CSV as a source, optionally time-shifted to now, paced, looped."""

    name = "replay"

    def __init__(self, cfg: ReplaySource, *, device_id: str, clock: Clock) -> None:
        self.cfg = cfg
        self.device_id = device_id
        self.clock = clock
        self.rows = CsvRows(cfg.path)
        self.done = False

    async def run(self, emit: Emit) -> None:
        loop_shift = 0
        while True:
            first_ts: int | None = None
            last_ts = 0
            step = 1000
            start_mono = self.clock.monotonic()
            shift = 0
            for ts, vals, rejects in self.rows:
                if ts is None:
                    await emit(SourceBatch([], rejects=rejects, local_clock=False))
                    continue
                if first_ts is None:
                    first_ts = ts
                    shift = (self.clock.time_ms() - ts) if self.cfg.shift_to_now else loop_shift
                if self.cfg.speed > 0:
                    await self.clock.sleep_until(start_mono + (ts - first_ts) / 1000.0
                                                 / self.cfg.speed)
                t = ts + shift
                if t > last_ts and last_ts:
                    step = t - last_ts
                last_ts = t
                await emit(SourceBatch(
                    [Reading(device_id=self.device_id, sensor=s, ts_ms=t, value=v)
                     for s, v in vals], rejects=rejects, local_clock=False))
            if not self.cfg.loop or first_ts is None:
                break
            loop_shift = last_ts + step - first_ts if not self.cfg.shift_to_now else 0
        self.done = True
