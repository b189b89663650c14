"""The idempotency ledger of InfluxDB and Timestream in PostgreSQL, shared by every
ingest replica on every host (``[cloud.influx] ledger_dsn`` / ``[cloud.timestream]
ledger_dsn``).

The per-host SQLite file (:class:`cloud.stores.ledger.SqliteLedger`) makes replicas on one
host exactly-once; replicas on two hosts each keep their own state, both write a batch
they both receive, and only the database's overwrite of the same point hides it. Here
the state lives in PostgreSQL: a batch's transaction locks its stream's idempotency row
(``SELECT ... FOR UPDATE``), the store writes the points over HTTP, then the new state,
the completeness ledger (streams, chunk digests, gap records, conflicts, the stored runs)
and any dead letters commit together. A replica that gets the same batch waits on the
row lock and then finds the sequence numbers taken: it acks ``duplicate`` and writes
nothing. The lock covers one stream, not the file: replicas writing different devices
never wait on each other (the SQLite ledger holds one write lock per file for the whole
HTTP write).

Tables live in their own schema (``ledger_schema``, created at :meth:`PgLedger.open` under
an advisory lock; the pool's ``search_path``). Connection failures, timeouts and server
errors are :class:`~cloud.stores.base.StoreUnavailable` (the device keeps the data and
retries); the pool reconnects by itself.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from cloud.dedup import IdempotencyState
from cloud.stores._pg_ledger import (
    PG_LEDGER_SCHEMA,
    pg_completeness,
    pg_dead_letter,
    pg_dead_letters,
    pg_digests,
    pg_gap_runs,
    pg_idempotency_state,
    pg_lock_state,
    pg_save_ledger,
)
from cloud.stores._sqlite import now_ms, runs_blob
from cloud.stores.base import StoreUnavailable, seq_runs
from cloud.stores.completeness import BatchMeta, BatchPlan, StreamReport
from cloud.stores.ledger import LedgerTxn

__all__ = ["PgLedger"]

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_LOCK_KEY = 0x706D6C67  # "pmlg": advisory lock serializing the schema set-up
_PG_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS idempotency (
  device_id text PRIMARY KEY,
  state bytea NOT NULL,
  updated_ms bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (
  id bigserial PRIMARY KEY,
  device_id text,
  batch_id text,
  reason text NOT NULL,
  payload bytea,
  received_ms bigint NOT NULL,
  peer text
);
CREATE TABLE IF NOT EXISTS stored_runs (
  id bigserial PRIMARY KEY,
  device_id text NOT NULL,
  instance text NOT NULL,
  runs bytea NOT NULL
);
CREATE INDEX IF NOT EXISTS stored_runs_stream ON stored_runs (device_id, instance);
""" + PG_LEDGER_SCHEMA


class _PgTxn(LedgerTxn):
    """The ledger steps of one batch on the transaction's connection."""

    def __init__(self, state: IdempotencyState, conn: Any) -> None:
        super().__init__(state)
        self.conn = conn

    async def digests(self, device_id: str, instance: str,
                      firsts: Sequence[int]) -> dict[int, tuple[int, int, int]]:
        return await pg_digests(self.conn, device_id, instance, firsts)

    async def gap_runs(self, device_id: str, instance: str, lo: int,
                       hi: int) -> list[tuple[int, int]]:
        return await pg_gap_runs(self.conn, device_id, instance, lo, hi)

    async def stored(self, device_id: str, instance: str, seqs: Sequence[int]) -> None:
        runs = seq_runs(list(seqs))
        if runs:
            await self.conn.execute("INSERT INTO stored_runs (device_id, instance, runs)"
                                    " VALUES ($1, $2, $3)", device_id, instance,
                                    runs_blob(runs))

    async def save_ledger(self, device_id: str, batch_id: str, meta: BatchMeta,
                          plan: BatchPlan, now: int) -> None:
        await pg_save_ledger(self.conn, device_id, batch_id, meta, plan, now)


class PgLedger:
    """Idempotency state, completeness ledger and dead letters in PostgreSQL (see the
    module docstring); the :class:`~cloud.stores.ledger.Ledger` of a LedgerBacked store."""

    def __init__(self, dsn: str, *, schema: str = "pymigrate_ledger", pool_min: int = 1,
                 pool_max: int = 4, command_timeout_s: float = 30.0,
                 connect_timeout_s: float = 5.0) -> None:
        if not _IDENT.match(schema):
            raise ValueError(f"schema {schema!r} is not a plain SQL identifier")
        self.dsn = dsn
        self.schema = schema
        self.pool_min, self.pool_max = pool_min, pool_max
        self.command_timeout_s = command_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._pool: asyncpg.Pool | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("ledger is not open")
        return self._pool

    async def open(self) -> None:
        """Create the schema and tables (once, under an advisory lock) and the pool."""
        try:
            conn = await asyncpg.connect(self.dsn, timeout=self.connect_timeout_s)
        except _PG_ERRORS as exc:
            raise StoreUnavailable(f"cannot connect to the PostgreSQL ledger: {exc}") from exc
        try:
            async with conn.transaction():
                await conn.execute(f"SELECT pg_advisory_xact_lock({_LOCK_KEY})")
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self.schema}")
                await conn.execute(f"SET LOCAL search_path TO {self.schema}")
                await conn.execute(_SCHEMA)
            self._pool = await asyncpg.create_pool(
                self.dsn, min_size=self.pool_min, max_size=self.pool_max,
                command_timeout=self.command_timeout_s, timeout=self.connect_timeout_s,
                server_settings={"search_path": self.schema,
                                 "application_name": "pymigrate-ledger"})
        except _PG_ERRORS as exc:
            raise StoreUnavailable(f"PostgreSQL ledger set-up failed: {exc}") from exc
        finally:
            await conn.close()

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    @asynccontextmanager
    async def transaction(self, device_id: str) -> AsyncIterator[LedgerTxn]:
        """Lock the stream's state row, yield it; commit a saved state and the dead
        letters with the ledger rows on success, roll everything back otherwise."""
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                state, _ = await pg_lock_state(conn, device_id)
                txn = _PgTxn(state, conn)
                yield txn
                if txn.saved is not None:
                    await conn.execute("UPDATE idempotency SET state = $2, updated_ms = $3"
                                       " WHERE device_id = $1", device_id,
                                       txn.saved.to_bytes(), now_ms())
                if txn.dead:
                    t = now_ms()
                    await conn.executemany(
                        "INSERT INTO dead_letters (device_id, batch_id, reason, payload,"
                        " received_ms) VALUES ($1, $2, $3, $4, $5)",
                        [(*d, t) for d in txn.dead])
        except _PG_ERRORS as exc:
            raise StoreUnavailable(f"PostgreSQL ledger: {type(exc).__name__}: {exc}") from exc

    async def report(self, device_id: str | None = None) -> list[StreamReport]:
        async with self.pool.acquire() as conn:
            return await pg_completeness(conn, device_id, recorded=True)

    async def dead_letter(self, device_id: str, batch_id: str, reason: str,
                          payload: bytes, *, peer: str = "") -> None:
        try:
            await pg_dead_letter(self.pool, device_id, batch_id, reason, payload, peer)
        except _PG_ERRORS as exc:
            raise StoreUnavailable(f"dead-letter write failed: {exc}") from exc

    async def dead_letters(self, limit: int = 100) -> list[tuple[str, str, str]]:
        return await pg_dead_letters(self.pool, limit)

    async def idempotency_state(self, device_id: str, instance: str = "") -> IdempotencyState:
        return await pg_idempotency_state(self.pool, device_id, instance)
