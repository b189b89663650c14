"""Embedded SQLite store (the default): one file, WAL, idempotent on (device_id, seq).

Table ``readings`` (documented in the README):

| column | type | meaning |
| --- | --- | --- |
| device_id | TEXT | device that produced the reading |
| instance | TEXT | the agent instance that numbered it ('' before envelope v4) |
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

Table ``idempotency`` holds one :class:`~cloud.dedup.IdempotencyState` blob per stream
(device and agent instance),
read and saved inside the write transaction (``BEGIN IMMEDIATE``: writers, including
other processes on the same file, serialize), so a resend is written zero times across
restarts and replicas sharing the file. ``dead_letters`` keeps rejected batches with
their reason and the peer that sent them. ``streams``, ``chunk_digests``, ``gaps`` and
``conflicts`` are the completeness ledger (:mod:`cloud.stores.completeness`), written in
the same transaction as the readings.
"""

from __future__ import annotations

import asyncio
import math
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from cloud.stores._sqlite import LEDGER_SCHEMA, SqliteStateFile, now_ms, open_sqlite, runs_blob
from cloud.stores.base import (
    Admit,
    AggregateRow,
    StoreRejected,
    StoreUnavailable,
    WriteResult,
    validate,
)
from cloud.stores.completeness import BatchMeta, plan_batch
from pymigrate.types import AggInfo, Priority, Reading, seq_runs_of

SCHEMA = """
CREATE TABLE IF NOT EXISTS readings (
  device_id TEXT NOT NULL,
  instance TEXT NOT NULL DEFAULT '',
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
  PRIMARY KEY (device_id, instance, seq)
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
  received_ms INTEGER NOT NULL,
  peer TEXT
);
"""

_INSERT = (
    "INSERT OR IGNORE INTO readings (device_id, seq, sensor, ts_ms, value, priority, quality,"
    " uncert_ms, raw_ts_ms, agg_rule, agg_fn, agg_window_end_ms, agg_count, received_ms,"
    " instance) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
_COLS_V1 = ("device_id, seq, sensor, ts_ms, value, priority, quality, uncert_ms, raw_ts_ms,"
            " agg_rule, agg_fn, agg_window_end_ms, agg_count, received_ms")
_SELECT = ("SELECT device_id, sensor, ts_ms, value, priority, seq, raw_ts_ms, quality,"
           " uncert_ms, agg_rule, agg_fn, agg_window_end_ms, agg_count FROM readings")



def row_to_reading(row: Sequence[Any]) -> Reading:
    """A ``_SELECT``-shaped row (also used by the PostgreSQL store) as a Reading."""
    agg = None
    if row[9] is not None or row[10] is not None:
        agg = AggInfo(row[9] or "", row[10] or "", int(row[11] or 0), int(row[12] or 0))
    return Reading(
        device_id=row[0], sensor=row[1], ts_ms=int(row[2]),
        value=math.nan if row[3] is None else float(row[3]),  # SQLite holds NaN as NULL
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
                                     schema=LEDGER_SCHEMA)
        try:
            await self._migrate()
            await self.db.executescript(SCHEMA)
        except BaseException:
            await self.close()
            raise

    async def _migrate(self) -> None:
        """Files written before agent instances: readings keyed (device, seq) get the
        ``instance`` column ('' for what they hold) in one transaction."""
        cols = [str(r[1]) for r in await self.db.execute_fetchall("PRAGMA table_info(readings)")]
        if cols and "instance" not in cols:
            db = self.db
            await db.execute("BEGIN IMMEDIATE")
            try:
                await db.execute("ALTER TABLE readings RENAME TO readings_v1")
                await db.execute("DROP INDEX IF EXISTS readings_series")
                await db.execute(SCHEMA.split(";")[0])  # CREATE TABLE readings
                await db.execute(f"INSERT INTO readings ({_COLS_V1}) SELECT {_COLS_V1} "
                                 "FROM readings_v1")
                await db.execute("DROP TABLE readings_v1")
                await db.execute("COMMIT")
            except BaseException:
                await db.execute("ROLLBACK")
                raise
        if cols:
            await self._migrate_ledger()

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()

    async def write(self, device_id: str, batch_id: str, readings: Sequence[Reading],
                    *, admit: Admit | None = None, meta: BatchMeta | None = None) -> WriteResult:
        validate(device_id, readings)
        meta = meta or BatchMeta()
        inst = meta.instance
        async with self._lock:
            db = self.db
            try:
                await db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"sqlite busy: {exc}", batch_id=batch_id) from exc
            try:
                state = await self._load_state(device_id, inst)
                now = now_ms()
                plan = await plan_batch(
                    state, readings, meta, admit, now_ms=now,
                    digests=lambda f: self._digests(device_id, inst, f),
                    gap_runs=lambda lo, hi: self._gap_runs(device_id, inst, lo, hi))
                written = 0
                if plan.delete:
                    await self._replace_out(plan.delete, now)
                if plan.write:
                    before = db.total_changes
                    await db.executemany(_INSERT, [
                        (r.device_id, r.seq, r.sensor, r.ts_ms, r.value, int(r.priority),
                         r.quality, r.uncert_ms, r.raw_ts_ms,
                         r.agg.rule if r.agg else None, r.agg.fn if r.agg else None,
                         r.agg.window_end_ms if r.agg else None,
                         r.agg.count if r.agg else None, now, inst)
                        for r in plan.write])
                    written = db.total_changes - before
                if plan.state is not None:
                    await self._save_state(device_id, inst, plan.state, now)
                await self._save_ledger(device_id, batch_id, meta, plan, now)
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
        # a write the (device, instance, seq) key swallowed (state lost or edited by hand)
        # is a duplicate
        return WriteResult(written=written,
                           duplicates=plan.duplicates + len(plan.write) - written,
                           gateway_dropped=len(plan.skipped), replaced=len(plan.delete),
                           conflicts=plan.conflicted, gaps=len(plan.gaps), late=plan.late)

    async def _replace_out(self, delete: Sequence[tuple[str, str, int]], now: int) -> None:
        """Delete stored copies a replacing gateway policy supersedes; each leaves a
        ``gateway_replaced`` gap on its own stream (unless the policy writes it back, e.g.
        ``average``: then the stored row wins in the accounting)."""
        gone: dict[tuple[str, str], list[int]] = {}
        for dev, inst_, seq in delete:  # that stream's row only (ids may be shared)
            for d, i, s in await self.db.execute_fetchall(
                    "DELETE FROM readings WHERE device_id = ? AND instance = ? AND seq = ? "
                    "RETURNING device_id, instance, seq", (dev, inst_, seq)):
                gone.setdefault((str(d), str(i)), []).append(int(s))
        for (dev, inst), seqs in gone.items():
            runs = seq_runs_of(seqs)
            await self.db.execute(
                "INSERT OR IGNORE INTO gaps (device_id, instance, seq_first, seq_last, count,"
                " reason, ts_ms, runs, detail, received_ms) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (dev, inst, runs[0][0], runs[-1][1], len(seqs), "gateway_replaced", now,
                 runs_blob(runs), "another gateway's copy of the event replaced it", now))

    async def _stored_runs(self, device_id: str, instance: str) -> list[tuple[int, int]]:
        runs: list[tuple[int, int]] = []
        async with self.db.execute(
                "SELECT seq FROM readings WHERE device_id = ? AND instance = ? ORDER BY seq",
                (device_id, instance)) as cur:
            async for (seq,) in cur:
                if runs and seq == runs[-1][1] + 1:
                    runs[-1] = (runs[-1][0], seq)
                else:
                    runs.append((seq, seq))
        return runs

    async def _legacy_streams(self, device_id: str | None) -> list[tuple[str, str]]:
        where, args = ("WHERE device_id = ?", (device_id,)) if device_id else ("", ())
        return [(str(d), str(i)) for d, i in await self.db.execute_fetchall(
            f"SELECT DISTINCT device_id, instance FROM readings {where}", args)]

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

    async def aggregate(self, device_id: str, sensor: str | None, start_ms: int | None,
                        end_ms: int | None, bucket_ms: int) -> list[AggregateRow]:
        """Per sensor and ``bucket_ms`` bucket (epoch-aligned, the window widened to
        whole buckets): min, max, avg, sum, count of ``value`` (``cloud query --agg``)."""
        if bucket_ms <= 0:
            raise ValueError("bucket_ms must be > 0")
        lo = None if start_ms is None else start_ms - start_ms % bucket_ms
        hi = None if end_ms is None else -((-end_ms) // bucket_ms) * bucket_ms
        sql = ("SELECT sensor, ts_ms - (((ts_ms % ?1) + ?1) % ?1) AS b, min(value),"
               " max(value), avg(value), sum(value), count(*) FROM readings"
               " WHERE device_id = ?2")
        args: list[object] = [bucket_ms, device_id]
        for cond, val in (("sensor = ", sensor), ("ts_ms >= ", lo), ("ts_ms < ", hi)):
            if val is not None:
                args.append(val)
                sql += f" AND {cond}?{len(args)}"
        sql += " GROUP BY sensor, b ORDER BY sensor, b"
        async with self.db.execute(sql, args) as cur:
            return [AggregateRow(str(r[0]), int(r[1]), float(r[2]), float(r[3]),
                                 float(r[4]), float(r[5]), int(r[6])) async for r in cur]

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
