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

Table ``idempotency`` holds one :class:`~cloud.dedup.IdempotencyState` blob per device,
read and saved inside the write transaction (``BEGIN IMMEDIATE``: writers, including
other processes on the same file, serialize), so a resend is written zero times across
restarts and replicas sharing the file. ``dead_letters`` keeps rejected batches with
their reason.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from cloud.stores._sqlite import SqliteStateFile, now_ms, open_sqlite
from cloud.stores.base import (
    Admit,
    StoreRejected,
    StoreUnavailable,
    WriteResult,
    plan_write,
    validate,
)
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
CREATE TABLE IF NOT EXISTS idempotency (
  device_id TEXT PRIMARY KEY,
  state BLOB NOT NULL,
  updated_ms INTEGER NOT NULL
) WITHOUT ROWID;
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
_SELECT = ("SELECT device_id, sensor, ts_ms, value, priority, seq, raw_ts_ms, quality,"
           " uncert_ms, agg_rule, agg_fn, agg_window_end_ms, agg_count FROM readings")



def row_to_reading(row: Sequence[Any]) -> Reading:
    """A ``_SELECT``-shaped row (also used by the PostgreSQL store) as a Reading."""
    agg = None
    if row[9] is not None or row[10] is not None:
        agg = AggInfo(row[9] or "", row[10] or "", int(row[11] or 0), int(row[12] or 0))
    return Reading(
        device_id=row[0], sensor=row[1], ts_ms=int(row[2]), value=float(row[3]),
        priority=Priority(row[4]), seq=int(row[5]),
        raw_ts_ms=None if row[6] is None else int(row[6]),
        quality=int(row[7]), uncert_ms=int(row[8]), agg=agg)


class SqliteStore(SqliteStateFile):
    """Idempotent SQLite store; ``write`` commits before returning.

    One connection per store; writes of one store instance are serialized by an
    asyncio lock (they share the connection), writes of several instances or processes
    on the same file by SQLite's write lock (``BEGIN IMMEDIATE`` + ``busy_timeout``).
    """

    name = "sqlite"

    def __init__(self, path: str | Path, *, busy_timeout_ms: int = 10_000) -> None:
        self.path = Path(path)
        self.busy_timeout_ms = busy_timeout_ms
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        self._db = await open_sqlite(self.path, busy_timeout_ms=self.busy_timeout_ms,
                                     schema=SCHEMA)

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()

    async def write(self, device_id: str, batch_id: str, readings: Sequence[Reading],
                    *, admit: Admit | None = None) -> WriteResult:
        validate(device_id, readings)
        async with self._lock:
            db = self.db
            try:
                await db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"sqlite busy: {exc}", batch_id=batch_id) from exc
            try:
                state = await self._load_state(device_id)
                plan = plan_write(state, readings, admit)
                written = 0
                now = now_ms()
                if plan.delete:
                    await db.executemany("DELETE FROM readings WHERE device_id = ? AND seq = ?",
                                         plan.delete)
                if plan.write:
                    before = db.total_changes
                    await db.executemany(_INSERT, [
                        (r.device_id, r.seq, r.sensor, r.ts_ms, r.value, int(r.priority),
                         r.quality, r.uncert_ms, r.raw_ts_ms,
                         r.agg.rule if r.agg else None, r.agg.fn if r.agg else None,
                         r.agg.window_end_ms if r.agg else None,
                         r.agg.count if r.agg else None, now)
                        for r in plan.write])
                    written = db.total_changes - before
                if plan.state is not None:
                    await db.execute(
                        "INSERT INTO idempotency (device_id, state, updated_ms) VALUES (?,?,?)"
                        " ON CONFLICT (device_id) DO UPDATE SET state = excluded.state,"
                        " updated_ms = excluded.updated_ms",
                        (device_id, plan.state.to_bytes(), now))
                await db.execute("COMMIT")
            except BaseException as exc:
                try:
                    await db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                if isinstance(exc, sqlite3.IntegrityError | sqlite3.DataError):
                    raise StoreRejected(str(exc), reason="constraint") from exc
                if isinstance(exc, sqlite3.Error):
                    raise StoreUnavailable(str(exc), batch_id=batch_id) from exc
                raise
        # a write the natural key swallowed (state lost or edited by hand) is a duplicate
        return WriteResult(written=written,
                           duplicates=plan.duplicates + len(plan.write) - written,
                           gateway_dropped=plan.skipped, replaced=len(plan.delete))

    async def query(self, device_id: str, sensor: str | None = None,
                    start_ms: int | None = None, end_ms: int | None = None) -> list[Reading]:
        sql = _SELECT + " WHERE device_id = ?"
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
        async with self.db.execute(sql, args) as cur:
            return [row_to_reading(row) async for row in cur]

    async def count(self, device_id: str | None = None) -> int:
        args: tuple[str, ...] = ()
        if device_id is None:
            sql = "SELECT COUNT(*) FROM readings"
        else:
            sql, args = "SELECT COUNT(*) FROM readings WHERE device_id = ?", (device_id,)
        async with self.db.execute(sql, args) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def dead_letter_count(self) -> int:
        async with self.db.execute("SELECT COUNT(*) FROM dead_letters") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0
