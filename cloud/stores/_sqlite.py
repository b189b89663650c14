"""Opening a cloud-side SQLite file the one way both the store and the ledger need."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiosqlite

from cloud.dedup import IdempotencyState


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

    async def _load_state(self, device_id: str) -> IdempotencyState:
        async with self.db.execute("SELECT state FROM idempotency WHERE device_id = ?",
                                   (device_id,)) as cur:
            row = await cur.fetchone()
        return IdempotencyState() if row is None else IdempotencyState.from_bytes(row[0])

    async def idempotency_state(self, device_id: str) -> IdempotencyState:
        async with self._lock:
            return await self._load_state(device_id)

    async def dead_letter(self, device_id: str, batch_id: str, reason: str,
                          payload: bytes) -> None:
        async with self._lock:
            await self.db.execute(
                "INSERT INTO dead_letters (device_id, batch_id, reason, payload, received_ms)"
                " VALUES (?,?,?,?,?)", (device_id, batch_id, reason, payload, now_ms()))

    async def dead_letters(self, limit: int = 100) -> list[tuple[str, str, str]]:
        async with self.db.execute(
                "SELECT device_id, batch_id, reason FROM dead_letters ORDER BY id DESC LIMIT ?",
                (limit,)) as cur:
            return [(str(a or ""), str(b or ""), str(c)) async for a, b, c in cur]
