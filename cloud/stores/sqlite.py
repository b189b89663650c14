"""Embedded SQLite store (the default): one file, WAL, idempotent on (device_id, seq).

Table ``readings`` (documented in the README):

| column | type | meaning |
| --- | --- | --- |
| device_id | TEXT | device that produced the reading |
| sensor | TEXT | sensor id |
| ts_ms | INTEGER | corrected timestamp, ms since epoch UTC |
| value | REAL | the value (booleans 0/1); for aggregates the function's result |
| seq | INTEGER | per-device sequence number (end-to-end idempotency key) |
| priority | INTEGER | 0 critical .. 3 low |
| quality | INTEGER | quality flags (pymigrate.types.Quality) |
| uncert_ms | INTEGER | estimated timestamp uncertainty |
| raw_ts_ms | INTEGER | timestamp as the device reported it (NULL if unchanged) |
| agg_rule, agg_fn, agg_window_end_ms, agg_count | | aggregate metadata (NULL for raw) |
| received_ms | INTEGER | ingest receive time |
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import aiosqlite

from cloud.stores.base import WriteResult
from pymigrate.types import AggInfo, Priority, Reading

SCHEMA = """
CREATE TABLE IF NOT EXISTS readings (
  device_id TEXT NOT NULL,
  seq INTEGER NOT NULL,
  sensor TEXT NOT NULL,
  ts_ms INTEGER NOT NULL,
  value REAL,
  priority INTEGER NOT NULL DEFAULT 2,
  quality INTEGER NOT NULL DEFAULT 0,
  uncert_ms INTEGER NOT NULL DEFAULT 0,
  raw_ts_ms INTEGER,
  agg_rule TEXT,
  agg_fn TEXT,
  agg_window_end_ms INTEGER,
  agg_count INTEGER,
  received_ms INTEGER NOT NULL,
  PRIMARY KEY (device_id, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS readings_series ON readings (device_id, sensor, ts_ms);
CREATE TABLE IF NOT EXISTS dead_letters (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  device_id TEXT,
  batch_id TEXT,
  reason TEXT NOT NULL,
  payload BLOB,
  received_ms INTEGER NOT NULL
);
"""

_INSERT = (
    "INSERT OR IGNORE INTO readings (device_id, seq, sensor, ts_ms, value, priority, quality,"
    " uncert_ms, raw_ts_ms, agg_rule, agg_fn, agg_window_end_ms, agg_count, received_ms)"
    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)


class SqliteStore:
    """Idempotent SQLite store; ``write`` commits before returning."""

    name = "sqlite"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db: aiosqlite.Connection | None = None

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = await aiosqlite.connect(self.path)
        await self._db.execute("PRAGMA journal_mode=WAL")
        await self._db.execute("PRAGMA synchronous=NORMAL")
        await self._db.executescript(SCHEMA)
        await self._db.commit()

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("store is not open")
        return self._db

    async def write(self, device_id: str, batch_id: str,
                    readings: Sequence[Reading]) -> WriteResult:
        now = time.time_ns() // 1_000_000
        rows = [
            (device_id, r.seq, r.sensor, r.ts_ms, r.value, int(r.priority), r.quality,
             r.uncert_ms, r.raw_ts_ms,
             r.agg.rule if r.agg else None, r.agg.fn if r.agg else None,
             r.agg.window_end_ms if r.agg else None, r.agg.count if r.agg else None, now)
            for r in readings
        ]
        db = self.db
        before = db.total_changes
        try:
            await db.executemany(_INSERT, rows)
            await db.commit()
        except BaseException:
            await db.rollback()
            raise
        written = db.total_changes - before
        return WriteResult(written=written, duplicates=len(rows) - written)

    async def dead_letter(self, device_id: str, batch_id: str, reason: str,
                          payload: bytes) -> None:
        await self.db.execute(
            "INSERT INTO dead_letters (device_id, batch_id, reason, payload, received_ms)"
            " VALUES (?,?,?,?,?)",
            (device_id, batch_id, reason, payload, time.time_ns() // 1_000_000))
        await self.db.commit()

    async def query(self, device_id: str, sensor: str | None = None,
                    start_ms: int | None = None, end_ms: int | None = None) -> list[Reading]:
        sql = ("SELECT device_id, sensor, ts_ms, value, priority, seq, raw_ts_ms, quality,"
               " uncert_ms, agg_rule, agg_fn, agg_window_end_ms, agg_count FROM readings"
               " WHERE device_id = ?")
        args: list[object] = [device_id]
        if sensor is not None:
            sql += " AND sensor = ?"
            args.append(sensor)
        if start_ms is not None:
            sql += " AND ts_ms >= ?"
            args.append(start_ms)
        if end_ms is not None:
            sql += " AND ts_ms < ?"
            args.append(end_ms)
        sql += " ORDER BY sensor, ts_ms, seq"
        out: list[Reading] = []
        async with self.db.execute(sql, args) as cur:
            async for row in cur:
                out.append(Reading(
                    device_id=row[0], sensor=row[1], ts_ms=row[2], value=row[3],
                    priority=Priority(row[4]), seq=row[5], raw_ts_ms=row[6], quality=row[7],
                    uncert_ms=row[8],
                    agg=AggInfo(row[9], row[10], row[11], row[12]) if row[9] is not None
                    or row[10] is not None else None))
        return out

    async def count(self, device_id: str | None = None) -> int:
        if device_id is None:
            sql, args = "SELECT COUNT(*) FROM readings", ()
        else:
            sql, args = "SELECT COUNT(*) FROM readings WHERE device_id = ?", (device_id,)
        async with self.db.execute(sql, args) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def dead_letter_count(self) -> int:
        async with self.db.execute("SELECT COUNT(*) FROM dead_letters") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0
