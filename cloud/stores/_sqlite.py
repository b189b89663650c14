"""Opening a cloud-side SQLite file the one way both the store and the ledger need, and
the completeness-ledger tables both keep (streams, chunk digests, gaps, conflicts)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

import aiosqlite
import msgspec

from cloud.dedup import IdempotencyState
from cloud.stores.completeness import BatchMeta, BatchPlan, StreamReport, account, runs_union
from pymigrate.types import Gap

STREAM_SEP = "\x1f"  # device ids may not hold control characters (stores.base.validate)

LEDGER_SCHEMA = """
CREATE TABLE IF NOT EXISTS streams (
  device_id TEXT NOT NULL,
  instance TEXT NOT NULL,
  seq_base INTEGER NOT NULL,
  hwm INTEGER NOT NULL,
  first_seen_ms INTEGER NOT NULL,
  last_seen_ms INTEGER NOT NULL,
  peer TEXT NOT NULL DEFAULT '',
  duplicates INTEGER NOT NULL DEFAULT 0,
  ranges_forgotten INTEGER NOT NULL DEFAULT 0,
  state_ranges INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (device_id, instance)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS chunk_digests (
  device_id TEXT NOT NULL,
  instance TEXT NOT NULL,
  seq_first INTEGER NOT NULL,
  seq_last INTEGER NOT NULL,
  count INTEGER NOT NULL,
  checksum INTEGER NOT NULL,
  PRIMARY KEY (device_id, instance, seq_first)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS gaps (
  device_id TEXT NOT NULL,
  instance TEXT NOT NULL,
  seq_first INTEGER NOT NULL,
  seq_last INTEGER NOT NULL,
  count INTEGER NOT NULL,
  reason TEXT NOT NULL,
  ts_ms INTEGER NOT NULL,
  runs BLOB,
  detail TEXT NOT NULL DEFAULT '',
  received_ms INTEGER NOT NULL,
  PRIMARY KEY (device_id, instance, seq_first, seq_last, reason)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS conflicts (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  device_id TEXT NOT NULL,
  instance TEXT NOT NULL,
  batch_id TEXT NOT NULL,
  seq_first INTEGER NOT NULL,
  seq_last INTEGER NOT NULL,
  count INTEGER NOT NULL,
  checksum INTEGER NOT NULL,
  stored_checksum INTEGER,
  payload BLOB,
  received_ms INTEGER NOT NULL
);
"""

_runs_enc = msgspec.msgpack.Encoder()
_runs_dec = msgspec.msgpack.Decoder(list[tuple[int, int]])


def runs_blob(runs: Sequence[tuple[int, int]]) -> bytes | None:
    return _runs_enc.encode(list(runs)) if runs else None


def stream_key(device_id: str, instance: str) -> str:
    """The idempotency-state key of a stream (the bare device id for instance '')."""
    return f"{device_id}{STREAM_SEP}{instance}" if instance else device_id


def gap_of_row(row: Sequence[object]) -> Gap:
    """(seq_first, seq_last, count, reason, ts_ms, runs, detail) -> Gap."""
    sf, sl, cnt, reason, ts, runs, detail = row
    rr = [(int(a), int(b)) for a, b in _runs_dec.decode(runs)] if runs else []  # type: ignore[arg-type]
    return Gap(int(sf), int(sl), int(cnt), str(reason), int(ts), rr,  # type: ignore[call-overload]
               str(detail or ""))


async def open_sqlite(path: Path, *, busy_timeout_ms: int, schema: str) -> aiosqlite.Connection:
    """Autocommit connection (transactions are explicit ``BEGIN IMMEDIATE``), WAL, and
    ``synchronous=FULL``: the ingest acks after commit and the device then deletes its
    copy, so a commit must survive a power cut, not just a process crash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = await aiosqlite.connect(path, isolation_level=None)
    try:
        await db.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=FULL")
        await db.executescript(schema)
    except BaseException:
        await db.close()
        raise
    return db


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class SqliteStateFile:
    """What the SQLite store and the ledger of InfluxDB/Timestream share: a connection,
    the per-device ``idempotency`` table and the ``dead_letters`` table."""

    _db: aiosqlite.Connection | None
    _lock: asyncio.Lock

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError(f"{type(self).__name__} is not open")
        return self._db

    async def _load_state(self, device_id: str, instance: str = "") -> IdempotencyState:
        async with self.db.execute("SELECT state FROM idempotency WHERE device_id = ?",
                                   (stream_key(device_id, instance),)) as cur:
            row = await cur.fetchone()
        return IdempotencyState() if row is None else IdempotencyState.from_bytes(row[0])

    async def _save_state(self, device_id: str, instance: str, state: IdempotencyState,
                          now: int) -> None:
        await self.db.execute(
            "INSERT INTO idempotency (device_id, state, updated_ms) VALUES (?,?,?)"
            " ON CONFLICT (device_id) DO UPDATE SET state = excluded.state,"
            " updated_ms = excluded.updated_ms",
            (stream_key(device_id, instance), state.to_bytes(), now))

    async def idempotency_state(self, device_id: str, instance: str = "") -> IdempotencyState:
        async with self._lock:
            return await self._load_state(device_id, instance)

    async def _migrate_ledger(self) -> None:
        """Columns added after a file was created (idempotent, one transaction)."""
        cols = {str(r[1]) for r in await self.db.execute_fetchall(
            "PRAGMA table_info(dead_letters)")}
        if "peer" not in cols:
            await self.db.execute("ALTER TABLE dead_letters ADD COLUMN peer TEXT")
        scols = {str(r[1]) for r in await self.db.execute_fetchall("PRAGMA table_info(streams)")}
        for col in ("ranges_forgotten", "state_ranges"):
            if scols and col not in scols:
                await self.db.execute(
                    f"ALTER TABLE streams ADD COLUMN {col} INTEGER NOT NULL DEFAULT 0")

    async def dead_letter(self, device_id: str, batch_id: str, reason: str,
                          payload: bytes, *, peer: str = "") -> None:
        async with self._lock:
            await self.db.execute(
                "INSERT INTO dead_letters (device_id, batch_id, reason, payload, received_ms,"
                " peer) VALUES (?,?,?,?,?,?)",
                (device_id, batch_id, reason, payload, now_ms(), peer))

    # -- completeness ledger (inside the caller's write transaction) -----------------------
    async def _digests(self, device_id: str, instance: str,
                       firsts: Sequence[int]) -> dict[int, tuple[int, int, int]]:
        if not firsts:
            return {}
        marks = ",".join("?" * len(firsts))
        rows = await self.db.execute_fetchall(
            "SELECT seq_first, seq_last, count, checksum FROM chunk_digests WHERE "
            f"device_id = ? AND instance = ? AND seq_first IN ({marks})",
            (device_id, instance, *firsts))
        return {int(a): (int(b), int(c), int(d)) for a, b, c, d in rows}

    async def _gap_runs(self, device_id: str, instance: str, lo: int,
                        hi: int) -> list[tuple[int, int]]:
        rows = await self.db.execute_fetchall(
            "SELECT seq_first, seq_last, count, reason, ts_ms, runs, detail FROM gaps WHERE "
            "device_id = ? AND instance = ? AND seq_first <= ? AND seq_last >= ? "
            "AND runs IS NOT NULL", (device_id, instance, hi, lo))
        return runs_union(*(gap_of_row(tuple(r)).runs for r in rows))

    async def _save_ledger(self, device_id: str, batch_id: str, meta: BatchMeta,
                           plan: BatchPlan, now: int) -> None:
        """Digests of new chunks, gap records, conflicts (payload kept), the stream row."""
        db, inst = self.db, meta.instance
        if plan.digests:
            await db.executemany(
                "INSERT OR IGNORE INTO chunk_digests (device_id, instance, seq_first, seq_last,"
                " count, checksum) VALUES (?,?,?,?,?,?)",
                [(device_id, inst, c.seq_first, c.seq_last, c.count, c.checksum)
                 for c in plan.digests])
        if plan.gaps:
            await db.executemany(
                "INSERT OR IGNORE INTO gaps (device_id, instance, seq_first, seq_last, count,"
                " reason, ts_ms, runs, detail, received_ms) VALUES (?,?,?,?,?,?,?,?,?,?)",
                [(device_id, inst, g.seq_first, g.seq_last, g.count, g.reason, g.ts_ms,
                  runs_blob(g.runs), g.detail, now)
                 for g in plan.gaps])
        if plan.conflicts:
            stored = await self._digests(device_id, inst,
                                         [c.seq_first for c, _ in plan.conflicts])
            await db.executemany(
                "INSERT INTO conflicts (device_id, instance, batch_id, seq_first, seq_last,"
                " count, checksum, stored_checksum, payload, received_ms)"
                " VALUES (?,?,?,?,?,?,?,?,?,?)",
                [(device_id, inst, batch_id, c.seq_first, c.seq_last, n, c.checksum,
                  stored[c.seq_first][2] if c.seq_first in stored else None, meta.payload,
                  now) for c, n in plan.conflicts])
        st = plan.state
        await db.execute(
            "INSERT INTO streams (device_id, instance, seq_base, hwm, first_seen_ms,"
            " last_seen_ms, peer, duplicates, ranges_forgotten, state_ranges)"
            " VALUES (?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT (device_id, instance) DO UPDATE SET"
            " seq_base = min(seq_base, excluded.seq_base), hwm = max(hwm, excluded.hwm),"
            " last_seen_ms = excluded.last_seen_ms, peer = excluded.peer,"
            " duplicates = duplicates + excluded.duplicates,"
            " ranges_forgotten = CASE WHEN ? THEN excluded.ranges_forgotten"
            " ELSE ranges_forgotten END,"
            " state_ranges = CASE WHEN ? THEN excluded.state_ranges ELSE state_ranges END",
            (device_id, inst, meta.seq_base, meta.hwm, now, now, meta.peer[:128],
             plan.duplicates, st.ranges_forgotten if st else 0,
             len(st.ranges()) if st else 0, st is not None, st is not None))

    async def _stored_runs(self, device_id: str, instance: str) -> list[tuple[int, int]]:
        """Sequence numbers stored for a stream, as runs (stores override)."""
        raise NotImplementedError

    async def _stored_duplicates(self, device_id: str, instance: str) -> int:
        return 0

    async def completeness(self, device_id: str | None = None) -> list[StreamReport]:
        """The completeness report of every stream (of one device)."""
        db = self.db
        where, args = ("WHERE device_id = ?", (device_id,)) if device_id else ("", ())
        extra: dict[tuple[str, str], tuple[int, int]] = {}
        streams: dict[tuple[str, str], tuple[int, int, int]] = {}
        for d, i, b, h, t, rf, sr in await db.execute_fetchall(
                "SELECT device_id, instance, seq_base, hwm, last_seen_ms, ranges_forgotten,"
                f" state_ranges FROM streams {where}", args):
            streams[(str(d), str(i))] = (int(b), int(h), int(t))
            extra[(str(d), str(i))] = (int(rf), int(sr))
        for d, i in await db.execute_fetchall(
                f"SELECT DISTINCT device_id, instance FROM gaps {where}", args):
            streams.setdefault((str(d), str(i)), (1, 0, 0))
        for d, i in await self._legacy_streams(device_id):
            streams.setdefault((d, i), (1, 0, 0))
        out: list[StreamReport] = []
        for (dev, inst), (base, hwm, seen) in sorted(streams.items()):
            gap_rows = await db.execute_fetchall(
                "SELECT seq_first, seq_last, count, reason, ts_ms, runs, detail FROM gaps "
                "WHERE device_id = ? AND instance = ?", (dev, inst))
            crow = list(await db.execute_fetchall(
                "SELECT coalesce(sum(count), 0) FROM conflicts WHERE device_id = ? AND "
                "instance = ?", (dev, inst)))
            out.append(account(
                dev, inst, seq_base=base, hwm=hwm, stored=await self._stored_runs(dev, inst),
                gaps=[gap_of_row(tuple(r)) for r in gap_rows],
                duplicates=await self._stored_duplicates(dev, inst),
                conflicts=int(crow[0][0]) if crow else 0, last_seen_ms=seen,
                ranges_forgotten=extra.get((dev, inst), (0, 0))[0],
                state_ranges=extra.get((dev, inst), (0, 0))[1]))
        return out

    async def _legacy_streams(self, device_id: str | None) -> list[tuple[str, str]]:
        """Streams that wrote before the ledger existed (stores override)."""
        return []

    async def dead_letters(self, limit: int = 100) -> list[tuple[str, str, str]]:
        async with self.db.execute(
                "SELECT device_id, batch_id, reason FROM dead_letters ORDER BY id DESC LIMIT ?",
                (limit,)) as cur:
            return [(str(a or ""), str(b or ""), str(c)) async for a, b, c in cur]
