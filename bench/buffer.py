"""Durable buffer benchmark: ``python -m bench buffer [--seconds S] [--producers P]
[--batch B] [--sensors N] [--codec NAME] [--skip-day]``.

Two measurements, both through the real :class:`agent.buffer.DurableBuffer` (SQLite WAL,
``synchronous=FULL``, group commit):

* ``ingest_readings_per_s``: P concurrent producers each append batches of B readings
  (N sensors x B/N seconds, like a source batch) for S seconds of wall time; only
  readings whose append returned (committed, fsynced) count.
* the offline day: one device with N sensors at 1 Hz for 24 h of virtual time
  (864,000 readings for N=10) from a weather-like generator with 0.1 resolution, all
  kept in the buffer; ``bytes_on_disk_24h`` is database + WAL after the day (open chunks
  flushed), ``state_bytes_24h`` every file the buffer keeps as allocated on disk (what
  ``budget_bytes`` bounds). ``python_peak_memory_bytes`` is the largest Python heap
  (tracemalloc) allocated outside this benchmark file (the buffer, its codec, aiosqlite)
  sampled every 10 minutes of virtual time while ingesting and holding the day;
  ``sqlite_peak_memory_bytes`` is SQLite's own allocator high-water mark over the day
  (``sqlite3_memory_highwater`` through ctypes, on the library ``_sqlite3`` links: page
  cache, schema, statements), which tracemalloc cannot see; ``buffer_peak_memory_bytes``
  is their sum. ``traced_peak_bytes`` is tracemalloc's true peak of everything, the
  generator's current batch included.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent.buffer import BufferConfig, DurableBuffer
from agent.codec import DEFAULT_CODEC
from bench import _sqlmem
from bench.common import emit
from pymigrate.clock import VirtualClock, WallClock
from pymigrate.types import Reading

DAY_S = 86_400
T0_MS = 1_767_225_600_000
SENSORS = ["temp_c", "rh_pct", "pressure_hpa", "wind_ms", "wind_dir_deg", "rain_mm_h",
           "solar_wm2", "dewpoint_c", "soil_moist_pct", "battery_v"]


class Weather:
    """A weather station: diurnal cycles plus slow random walks, 0.1 resolution."""

    def __init__(self, sensors: int, seed: int = 1) -> None:
        self.rnd = random.Random(seed)
        self.names = [SENSORS[i % len(SENSORS)] + ("" if i < len(SENSORS) else f"_{i}")
                      for i in range(sensors)]
        self.walk = [0.0] * sensors

    def values(self, t_s: int) -> list[float]:
        day = math.sin(2 * math.pi * ((t_s % DAY_S) / DAY_S - 0.25))
        out = []
        for i, _ in enumerate(self.names):
            self.walk[i] = 0.999 * self.walk[i] + self.rnd.gauss(0, 0.02)
            w = self.walk[i]
            kind = i % len(SENSORS)
            if kind == 0:
                v = 12 + 6 * day + w
            elif kind == 1:
                v = 70 - 15 * day + 3 * w
            elif kind == 2:
                v = 1013 + 2 * w
            elif kind == 3:
                v = max(0.0, 3 + 2 * w + abs(self.rnd.gauss(0, 0.3)))
            elif kind == 4:
                v = (200 + 40 * w) % 360
            elif kind == 5:
                v = max(0.0, 5 * w - 0.5)
            elif kind == 6:
                v = max(0.0, 800 * day)
            elif kind == 7:
                v = 6 + 3 * day + w
            elif kind == 8:
                v = 31 + w
            else:
                v = 3.6 + 0.1 * w
            out.append(round(v, 1))
        return out

    def batch(self, device: str, t_s: int, seconds: int) -> list[Reading]:
        out = []
        for s in range(t_s, t_s + seconds):
            ts = T0_MS + s * 1000
            for name, v in zip(self.names, self.values(s)):
                out.append(Reading(device, name, ts, v))
        return out


def _batches(sensors: int, per_batch: int, count: int) -> Iterator[list[Reading]]:
    w = Weather(sensors, seed=2)
    secs = max(1, per_batch // sensors)
    for i in range(count):
        yield w.batch("bench-dev", i * secs, secs)


async def ingest(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    cfg = BufferConfig(path=str(tmp / "ingest.db"), codec=args.codec,
                       budget_bytes=1 << 30, commit_window_ms=args.commit_window_ms,
                       commit_max_readings=args.commit_max_readings)
    buf = DurableBuffer(cfg, clock=WallClock())
    await buf.open()
    # pre-generated source batches (generation is not the buffer's cost); reused: the
    # buffer returns new readings with seq set and never mutates its input
    pool = list(_batches(args.sensors, args.batch, 64))
    done = 0
    stop = False

    async def producer(k: int) -> None:
        nonlocal done
        i = k
        while not stop:
            n = len(await buf.append(pool[i % len(pool)]))
            done += n  # not "done += await ...": that would read done before awaiting
            i += args.producers

    await buf.append(pool[0])  # warm up
    done = 0
    c0 = buf.stats().commits
    t0 = time.perf_counter()
    tasks = [asyncio.create_task(producer(k)) for k in range(args.producers)]
    await asyncio.sleep(args.seconds)
    stop = True
    await asyncio.gather(*tasks)
    dt = time.perf_counter() - t0
    commits = buf.stats().commits - c0
    await buf.close()
    return {"ingest_readings_per_s": round(done / dt), "ingest_readings": done,
            "ingest_seconds": round(dt, 3), "ingest_commits": commits,
            "ingest_readings_per_commit": round(done / max(commits, 1), 1)}


def _files_size(d: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in d.glob(pattern) if not p.name.endswith(".seq"))


def _blocks(d: Path, pattern: str) -> int:
    return sum(p.stat().st_blocks * 512 for p in d.glob(pattern))


def _attributable(snapshot: tracemalloc.Snapshot) -> int:
    me = os.path.abspath(__file__)
    snap = snapshot.filter_traces([tracemalloc.Filter(False, me),
                                   tracemalloc.Filter(False, tracemalloc.__file__)])
    return sum(s.size for s in snap.statistics("filename"))


async def day(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    clock = VirtualClock(start_ms=T0_MS)
    cfg = BufferConfig(path=str(tmp / "day.db"), codec=args.codec, commit_window_ms=0)
    weather = Weather(args.sensors, seed=3)
    step = args.day_batch_s
    tracemalloc.start()
    sql_base = _sqlmem.used()
    _sqlmem.highwater(reset=True)
    base = _attributable(tracemalloc.take_snapshot())
    tracemalloc.reset_peak()
    base_total = tracemalloc.get_traced_memory()[0]
    buf = DurableBuffer(cfg, clock=clock)
    await buf.open()
    peak = 0
    t0 = time.perf_counter()
    for t_s in range(0, DAY_S, step):
        batch = weather.batch("station-1", t_s, step)
        await buf.append(batch)
        del batch
        await clock.advance(step)
        if t_s % 600 == 0:
            peak = max(peak, _attributable(tracemalloc.take_snapshot()) - base)
    await buf.flush()
    peak = max(peak, _attributable(tracemalloc.take_snapshot()) - base)
    traced_peak = tracemalloc.get_traced_memory()[1] - base_total
    tracemalloc.stop()
    sql_peak = _sqlmem.highwater() - sql_base
    elapsed = time.perf_counter() - t0
    s = buf.stats()
    readings = sum(s.readings_pending.values())
    await buf.close()
    state_bytes = _blocks(tmp, "day.db*")
    closed = _files_size(tmp, "day.db*")
    return {
        "bytes_on_disk_24h": s.bytes_on_disk,
        "bytes_on_disk_24h_after_close": closed,
        "payload_bytes_24h": s.payload_bytes,
        "readings_24h": readings,
        "chunks_24h": s.chunks_pending,
        "bytes_per_reading": round(s.bytes_on_disk / max(readings, 1), 3),
        "payload_bytes_per_reading": round(s.payload_bytes / max(readings, 1), 3),
        "state_bytes_24h": s.state_bytes,
        "state_bytes_24h_after_close": state_bytes,
        "buffer_peak_memory_bytes": peak + sql_peak,
        "python_peak_memory_bytes": peak,
        "sqlite_peak_memory_bytes": sql_peak if _sqlmem.available() else None,
        "sqlite_cache_kib": cfg.cache_kib,
        "traced_peak_bytes": traced_peak,
        "day_wall_seconds": round(elapsed, 2),
    }


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench buffer")
    ap.add_argument("--seconds", type=float, default=3.0, help="ingest duration (wall)")
    ap.add_argument("--producers", type=int, default=16)
    ap.add_argument("--batch", type=int, default=100, help="readings per append call")
    ap.add_argument("--sensors", type=int, default=10)
    ap.add_argument("--commit-window-ms", type=int, default=100)
    ap.add_argument("--commit-max-readings", type=int, default=1000)
    ap.add_argument("--day-batch-s", type=int, default=60,
                    help="seconds of readings per append in the day run")
    ap.add_argument("--codec", default=DEFAULT_CODEC)
    ap.add_argument("--skip-day", action="store_true")
    args = ap.parse_args(argv)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-buffer-") as d:
        results.update(asyncio.run(ingest(args, Path(d))))
        if not args.skip_day:
            results.update(asyncio.run(day(args, Path(d))))
    params = {k: v for k, v in vars(args).items()}
    params.update({"synchronous": "FULL", "journal_mode": "WAL",
                   "chunk_max_readings": BufferConfig().chunk_max_readings,
                   "day_readings": DAY_S * args.sensors})
    emit("buffer", params, results)
    return 0
