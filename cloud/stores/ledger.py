"""Idempotency state and dead letters in a small SQLite file, for stores without
multi-statement transactions (InfluxDB, Timestream).

:meth:`SqliteLedger.transaction` holds SQLite's write lock (``BEGIN IMMEDIATE``) for the
whole batch: read the device's state, write to the time-series database, save the state,
commit. Replicas on one host sharing the file serialize there like PostgreSQL's
``FOR UPDATE``. The state is saved only after the database accepted the points, so a
crash in between makes a resend write again; those stores overwrite the same point
(series and timestamp, the timestamp carrying the seq: see the stores), so that is
harmless (idempotent) rather than a duplicate.

The ledger follows what the database really holds (:class:`LedgerBacked`): a store's
``_sink`` reports which readings landed, which the database refused one by one (each
becomes a dead letter with its reason, in the same ledger transaction as the state), and
the error that stopped it part way. When a later request of a batch fails, the state
still records the readings of the requests that landed, so the ledger never says "not
stored" about stored data; the device's resend writes only the rest.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

import aiosqlite
import msgspec

from cloud.dedup import IdempotencyState
from cloud.stores._sqlite import (
    LEDGER_SCHEMA,
    SqliteStateFile,
    _runs_dec,
    now_ms,
    open_sqlite,
    runs_blob,
    stream_key,
)
from cloud.stores.base import (
    Admit,
    StoreRejected,
    StoreUnavailable,
    WriteResult,
    require_finite,
    seq_runs,
    validate,
)
from cloud.stores.completeness import (
    BatchMeta,
    BatchPlan,
    StreamReport,
    plan_batch,
    runs_union,
)
from pymigrate.types import Gap, Reading

__all__ = ["Ledger", "LedgerBacked", "LedgerTxn", "SinkOutcome", "SqliteLedger"]

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
CREATE TABLE IF NOT EXISTS stored_runs (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  device_id TEXT NOT NULL,
  instance TEXT NOT NULL,
  runs BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS stored_runs_stream ON stored_runs (device_id, instance);
"""



class LedgerTxn:
    """One device's state inside a ledger transaction; ``save`` it to keep the change.

    The completeness-ledger steps of a batch (``digests``, ``gap_runs``, ``stored``,
    ``save_ledger``) run inside the same transaction: the ledger kind (SQLite file,
    PostgreSQL) supplies them."""

    def __init__(self, state: IdempotencyState) -> None:
        self.state = state
        self.saved: IdempotencyState | None = None
        self.dead: list[tuple[str, str, str, bytes]] = []

    def save(self, state: IdempotencyState | None) -> None:
        self.saved = state

    def dead_letter(self, device_id: str, batch_id: str, reason: str, payload: bytes) -> None:
        """A dead letter committed with the state (or not at all)."""
        self.dead.append((device_id, batch_id, reason, payload))

    async def digests(self, device_id: str, instance: str,
                      firsts: Sequence[int]) -> dict[int, tuple[int, int, int]]:
        raise NotImplementedError

    async def gap_runs(self, device_id: str, instance: str, lo: int,
                       hi: int) -> list[tuple[int, int]]:
        raise NotImplementedError

    async def stored(self, device_id: str, instance: str, seqs: Sequence[int]) -> None:
        """Record which sequence numbers landed in the time-series database: what the
        completeness report counts as stored."""
        raise NotImplementedError

    async def save_ledger(self, device_id: str, batch_id: str, meta: BatchMeta,
                          plan: BatchPlan, now: int) -> None:
        raise NotImplementedError


class _SqliteTxn(LedgerTxn):
    def __init__(self, state: IdempotencyState, ledger: SqliteLedger) -> None:
        super().__init__(state)
        self.ledger = ledger

    async def digests(self, device_id: str, instance: str,
                      firsts: Sequence[int]) -> dict[int, tuple[int, int, int]]:
        return await self.ledger._digests(device_id, instance, firsts)

    async def gap_runs(self, device_id: str, instance: str, lo: int,
                       hi: int) -> list[tuple[int, int]]:
        return await self.ledger._gap_runs(device_id, instance, lo, hi)

    async def stored(self, device_id: str, instance: str, seqs: Sequence[int]) -> None:
        await self.ledger._stored(device_id, instance, seqs)

    async def save_ledger(self, device_id: str, batch_id: str, meta: BatchMeta,
                          plan: BatchPlan, now: int) -> None:
        await self.ledger._save_ledger(device_id, batch_id, meta, plan, now)


class Ledger(Protocol):
    """What :class:`LedgerBacked` needs of a ledger (:class:`SqliteLedger`, or
    :class:`cloud.stores.ledger_pg.PgLedger` for replicas on several hosts)."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    def transaction(self, device_id: str) -> AbstractAsyncContextManager[LedgerTxn]: ...
    async def report(self, device_id: str | None = None) -> list[StreamReport]: ...
    async def dead_letter(self, device_id: str, batch_id: str, reason: str,
                          payload: bytes, *, peer: str = "") -> None: ...
    async def dead_letters(self, limit: int = 100) -> list[tuple[str, str, str]]: ...
    async def idempotency_state(self, device_id: str,
                                instance: str = "") -> IdempotencyState: ...


class SqliteLedger(SqliteStateFile):
    """Per-device idempotency state + dead-letter table in one SQLite file (WAL)."""

    def __init__(self, path: str | Path, *, busy_timeout_ms: int = 30_000) -> None:
        self.path = Path(path)
        self.busy_timeout_ms = busy_timeout_ms
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        self._db = await open_sqlite(self.path, busy_timeout_ms=self.busy_timeout_ms,
                                     schema=_SCHEMA + LEDGER_SCHEMA)
        await self._migrate_ledger()

    async def _stored(self, device_id: str, instance: str, seqs: Sequence[int]) -> None:
        """Record which sequence numbers landed (inside the write transaction)."""
        runs = seq_runs(list(seqs))
        if runs:
            await self.db.execute("INSERT INTO stored_runs (device_id, instance, runs) "
                                  "VALUES (?,?,?)", (device_id, instance, runs_blob(runs)))

    async def _stored_runs(self, device_id: str, instance: str) -> list[tuple[int, int]]:
        rows = await self.db.execute_fetchall(
            "SELECT runs FROM stored_runs WHERE device_id = ? AND instance = ?",
            (device_id, instance))
        return runs_union(*(_runs_dec.decode(r[0]) for r in rows))

    async def _legacy_streams(self, device_id: str | None) -> list[tuple[str, str]]:
        where, args = ("WHERE device_id = ?", (device_id,)) if device_id else ("", ())
        return [(str(d), str(i)) for d, i in await self.db.execute_fetchall(
            f"SELECT DISTINCT device_id, instance FROM stored_runs {where}", args)]

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()

    async def report(self, device_id: str | None = None) -> list[StreamReport]:
        """The completeness report (not while a write transaction holds the file)."""
        async with self._lock:
            return await self.completeness(device_id)

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
                txn = _SqliteTxn(await self._load_state(device_id), self)
                yield txn
                if txn.saved is not None:
                    await db.execute(
                        "INSERT INTO idempotency (device_id, state, updated_ms) VALUES (?,?,?)"
                        " ON CONFLICT (device_id) DO UPDATE SET state = excluded.state,"
                        " updated_ms = excluded.updated_ms",
                        (device_id, txn.saved.to_bytes(), now_ms()))
                if txn.dead:
                    t = now_ms()
                    await db.executemany(
                        "INSERT INTO dead_letters (device_id, batch_id, reason, payload,"
                        " received_ms) VALUES (?,?,?,?,?)", [(*d, t) for d in txn.dead])
                await db.execute("COMMIT")
            except BaseException:
                try:
                    await db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                raise



class SinkOutcome(msgspec.Struct):
    """What a store's ``_sink`` did with the readings it was handed: ``stored`` landed,
    ``rejected`` were refused one by one as ``(reading, reason code, detail)``, and
    ``error`` (if any) stopped it part way (the rest did not land, or may not have)."""

    stored: list[Reading]
    rejected: list[tuple[Reading, str, str]] = msgspec.field(default_factory=list)
    error: Exception | None = None


def rejected_payload(r: Reading, detail: str) -> bytes:
    """The dead-letter payload of one refused reading: the reading and why (JSON)."""
    return msgspec.json.encode({"reading": r, "detail": detail})


class LedgerBacked:
    """What a store without transactions of its own (InfluxDB, Timestream) shares: the
    idempotency step and dead letters live in a :class:`Ledger` (a :class:`SqliteLedger`
    file per host, or PostgreSQL shared by every replica), and ``write`` hands the
    readings still to be stored to the store's own ``_sink``."""

    ledger: Ledger

    async def _sink(self, readings: list[Reading], instance: str = "") -> SinkOutcome:
        raise NotImplementedError

    async def write(self, device_id: str, batch_id: str, readings: Sequence[Reading],
                    *, admit: Admit | None = None, meta: Any = None) -> WriteResult:
        validate(device_id, readings)
        require_finite(readings)
        meta = meta if isinstance(meta, BatchMeta) else BatchMeta()
        inst = meta.instance
        async with self.ledger.transaction(stream_key(device_id, inst)) as txn:
            before = txn.state.to_bytes()
            now = now_ms()
            plan = await plan_batch(
                txn.state, readings, meta, admit, now_ms=now,
                digests=lambda f: txn.digests(device_id, inst, f),
                gap_runs=lambda lo, hi: txn.gap_runs(device_id, inst, lo, hi))
            out = await self._sink(plan.write, inst) if plan.write else SinkOutcome([])
            if out.error is None and out.rejected and not out.stored and not plan.skipped:
                # the database refused every reading: the batch as a whole is rejected
                # (the ingest dead-letters its payload); nothing to commit
                r, reason, detail = out.rejected[0]
                raise StoreRejected(f"{len(out.rejected)} readings refused, e.g. seq {r.seq}:"
                                    f" {detail}", reason=reason)
            for r, reason, detail in out.rejected:
                txn.dead_letter(device_id, batch_id, reason, rejected_payload(r, detail))
            refused = seq_runs([r.seq for r, _, _ in out.rejected if r.device_id == device_id])
            if refused:  # dead-lettered one by one: the ledger names them
                plan.gaps.append(Gap(refused[0][0], refused[-1][1],
                                     sum(b - a + 1 for a, b in refused), "rejected", now,
                                     refused, out.rejected[0][1]))
            await txn.stored(device_id, inst, [r.seq for r in out.stored
                                               if r.device_id == device_id])
            if out.error is None:
                txn.save(plan.state)
                await txn.save_ledger(device_id, batch_id, meta, plan, now)
            else:  # record exactly what landed (or was dead-lettered), then fail
                handled = [r.seq for r in out.stored if r.device_id == device_id]
                handled += [r.seq for r, _, _ in out.rejected if r.device_id == device_id]
                state = None
                if handled:
                    state = IdempotencyState.from_bytes(before)
                    for a, b in seq_runs(handled):
                        state.add_range(a, b)
                txn.save(state)
        if out.error is not None:
            raise out.error
        # a replacing gateway policy cannot delete the other copy here (see config)
        return WriteResult(written=len(out.stored), duplicates=plan.duplicates,
                           gateway_dropped=len(plan.skipped), rejected=len(out.rejected),
                           conflicts=plan.conflicted, gaps=len(plan.gaps), late=plan.late)

    async def completeness(self, device_id: str | None = None) -> list[StreamReport]:
        """The completeness report of every stream (of one device), from the ledger."""
        return await self.ledger.report(device_id)

    async def dead_letter(self, device_id: str, batch_id: str, reason: str,
                          payload: bytes, *, peer: str = "") -> None:
        await self.ledger.dead_letter(device_id, batch_id, reason, payload, peer=peer)

    async def dead_letters(self, limit: int = 100) -> list[tuple[str, str, str]]:
        return await self.ledger.dead_letters(limit)

    async def idempotency_state(self, device_id: str, instance: str = "") -> IdempotencyState:
        return await self.ledger.idempotency_state(device_id, instance)
