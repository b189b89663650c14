"""Idempotency state and dead letters in a small SQLite file, for stores without
multi-statement transactions (InfluxDB, Timestream).

:meth:`SqliteLedger.transaction` holds SQLite's write lock (``BEGIN IMMEDIATE``) for the
whole batch: read the device's state, write to the time-series database, save the state,
commit. Replicas on one host sharing the file serialize there like PostgreSQL's
``FOR UPDATE``. The state is saved only after the database accepted the points, so a
crash in between makes a resend write again; those stores overwrite the same series
and timestamp, so that is harmless (idempotent) rather than a duplicate.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite

from cloud.dedup import IdempotencyState
from cloud.stores._sqlite import SqliteStateFile, now_ms, open_sqlite
from cloud.stores.base import (
    Admit,
    StoreUnavailable,
    WriteResult,
    plan_write,
    require_finite,
    validate,
)
from pymigrate.types import Reading

__all__ = ["LedgerTxn", "SqliteLedger"]

_SCHEMA = """
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



class LedgerTxn:
    """One device's state inside a ledger transaction; ``save`` it to keep the change."""

    def __init__(self, state: IdempotencyState) -> None:
        self.state = state
        self.saved: IdempotencyState | None = None

    def save(self, state: IdempotencyState | None) -> None:
        self.saved = state


class SqliteLedger(SqliteStateFile):
    """Per-device idempotency state + dead-letter table in one SQLite file (WAL)."""

    def __init__(self, path: str | Path, *, busy_timeout_ms: int = 30_000) -> None:
        self.path = Path(path)
        self.busy_timeout_ms = busy_timeout_ms
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        self._db = await open_sqlite(self.path, busy_timeout_ms=self.busy_timeout_ms,
                                     schema=_SCHEMA)
        await self._migrate_ledger()

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()

    @asynccontextmanager
    async def transaction(self, device_id: str) -> AsyncIterator[LedgerTxn]:
        """Lock, load the device's state, yield it; commit a saved state on success."""
        async with self._lock:
            db = self.db
            try:
                await db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"idempotency ledger busy: {exc}") from exc
            try:
                txn = LedgerTxn(await self._load_state(device_id))
                yield txn
                if txn.saved is not None:
                    await db.execute(
                        "INSERT INTO idempotency (device_id, state, updated_ms) VALUES (?,?,?)"
                        " ON CONFLICT (device_id) DO UPDATE SET state = excluded.state,"
                        " updated_ms = excluded.updated_ms",
                        (device_id, txn.saved.to_bytes(), now_ms()))
                await db.execute("COMMIT")
            except BaseException:
                try:
                    await db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                raise



class LedgerBacked:
    """What a store without transactions of its own (InfluxDB, Timestream) shares: the
    idempotency step and dead letters live in a :class:`SqliteLedger`, and ``write``
    hands the readings still to be stored to the store's own ``_sink``."""

    ledger: SqliteLedger

    async def _sink(self, readings: list[Reading]) -> None:
        raise NotImplementedError

    async def write(self, device_id: str, batch_id: str, readings: Sequence[Reading],
                    *, admit: Admit | None = None, meta: Any = None) -> WriteResult:
        validate(device_id, readings)
        require_finite(readings)
        async with self.ledger.transaction(device_id) as txn:
            plan = plan_write(txn.state, readings, admit)
            if plan.write:
                await self._sink(plan.write)
            txn.save(plan.state)
        # a replacing gateway policy cannot delete the other copy here (see config)
        return WriteResult(written=len(plan.write), duplicates=plan.duplicates,
                           gateway_dropped=plan.skipped)

    async def dead_letter(self, device_id: str, batch_id: str, reason: str,
                          payload: bytes, *, peer: str = "") -> None:
        await self.ledger.dead_letter(device_id, batch_id, reason, payload, peer=peer)

    async def dead_letters(self, limit: int = 100) -> list[tuple[str, str, str]]:
        return await self.ledger.dead_letters(limit)

    async def idempotency_state(self, device_id: str) -> IdempotencyState:
        return await self.ledger.idempotency_state(device_id)
