"""PostgreSQL / TimescaleDB store via asyncpg: pooled, versioned schema, exactly-once writes.

Schema (created or migrated at :meth:`PostgresStore.open`, under an advisory lock so
replicas starting together do not race; applied versions are recorded in
``pymigrate_migrations``):

- ``readings``: the SQLite store's columns (``device_id, seq, sensor, ts_ms, value,
  priority, quality, uncert_ms, raw_ts_ms``, aggregate metadata ``agg_rule, agg_fn,
  agg_window_end_ms, agg_count``, and ``received_ms``), unique on ``(device_id, seq)``
  (plus ``ts_ms`` on a hypertable, whose unique keys must hold the time column), so
  every insert is ``ON CONFLICT DO NOTHING``: an upsert that is the second line of
  defence after the idempotency state. Index ``(device_id, sensor, ts_ms)`` for queries.
- ``idempotency``: one :class:`~cloud.dedup.IdempotencyState` blob per device.
- ``dead_letters``: rejected batches with their reason.

TimescaleDB (``timescale = "auto" | "on" | "off"``): with ``auto`` (default) the store uses
the extension when the server can run it (:func:`cloud.stores.timescale.probe`: created,
or packaged *and* preloaded) and otherwise falls back to plain tables with one warning
saying why; ``on`` makes that a :class:`~pymigrate.errors.ConfigError` naming
``cloud.postgres.timescale``; ``off`` never looks. On TimescaleDB ``readings`` is a
hypertable on ``ts_ms`` (integer milliseconds) with compression, optional retention and
the hourly continuous aggregate ``readings_1h`` (:mod:`cloud.stores.timescale`).

Exactly once on a hypertable: its unique keys must hold the time column, so the key is
``(device_id, seq, ts_ms)`` and the database alone no longer forbids one (device, seq) at
two timestamps. What keeps the promise is the device's idempotency state, read ``FOR
UPDATE`` and saved in the same transaction as the rows: a seq it contains is never
written again, whatever its timestamp. The key still catches an exact resend when the
state was lost, and the staged fallback then inserts only rows whose (device_id, seq) is
not stored at all (``NOT EXISTS``, served by the key's ``(device_id, seq)`` prefix).

A batch is one transaction: ``SELECT state ... FOR UPDATE`` (two replicas writing the
same device serialize here), only readings whose seq the state does not contain are
written, in bulk (``bulk = "copy"``: ``COPY`` straight into ``readings`` inside a
savepoint, since the locked state says the rows are new; if the unique key still fires
(state lost or restored from an older backup) the savepoint is rolled back and the rows
go through a temporary staging table and ``INSERT ... SELECT ... ON CONFLICT DO
NOTHING``; ``bulk = "unnest"``: one ``INSERT ... SELECT FROM unnest($arrays) ON CONFLICT
DO NOTHING``), then the new state is saved and the transaction
commits. Data errors (SQLSTATE classes 22 and 23, or a value asyncpg cannot encode
for its column) raise :class:`~cloud.stores.base.StoreRejected`; everything else
(refused connection, killed backend, timeout) raises
:class:`~cloud.stores.base.StoreUnavailable`; the pool reconnects by itself when the
server is back.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg
import structlog
from asyncpg.exceptions._base import DataError as _ClientDataError

from cloud.dedup import IdempotencyState
from cloud.stores import timescale as tsdb
from cloud.stores._pg_ledger import (
    PG_LEDGER_SCHEMA,
    pg_completeness,
    pg_dead_letter,
    pg_dead_letters,
    pg_digests,
    pg_gap_runs,
    pg_idempotency_state,
    pg_lock_state,
    pg_replace_out,
    pg_save_ledger,
)
from cloud.stores._sqlite import stream_key
from cloud.stores.base import (
    Admit,
    AggregateRow,
    StoreRejected,
    StoreUnavailable,
    WriteResult,
    validate,
)
from cloud.stores.completeness import BatchMeta, StreamReport, plan_batch
from cloud.stores.sqlite import row_to_reading
from pymigrate.errors import ConfigError
from pymigrate.types import Reading

__all__ = ["MIGRATIONS", "TIMESCALE_MODES", "PostgresStore", "migrate"]

log = structlog.get_logger("pymigrate.cloud.postgres")
TIMESCALE_MODES = ("auto", "on", "off")

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_LOCK_KEY = 0x706D6967  # "pmig": advisory lock serializing migrations
_STAGING = "pm_staging"
_COLS = ("seq", "sensor", "ts_ms", "value", "priority", "quality", "uncert_ms", "raw_ts_ms",
         "agg_rule", "agg_fn", "agg_window_end_ms", "agg_count")
_TYPES = ("bigint", "text", "bigint", "double precision", "smallint", "integer", "integer",
          "bigint", "text", "text", "bigint", "integer")
_COLLIST = ", ".join(_COLS)
_ALLCOLS = ("device_id", "instance", *_COLS, "received_ms")
_CREATE_STAGING = (f"CREATE TEMP TABLE IF NOT EXISTS {_STAGING} ("
                   + ", ".join(f"{c} {t}" for c, t in zip(_COLS, _TYPES))
                   + ") ON COMMIT DELETE ROWS")
_INSERT_STAGED = (f"INSERT INTO readings (device_id, instance, {_COLLIST}, received_ms)"
                  f" SELECT $1, $3, {_COLLIST}, $2 FROM {_STAGING} ON CONFLICT DO NOTHING")
# a hypertable's key holds ts_ms: also skip a (device_id, seq) stored at another time
_INSERT_STAGED_HT = (f"INSERT INTO readings (device_id, instance, {_COLLIST}, received_ms)"
                     f" SELECT $1, $3, {_COLLIST}, $2 FROM {_STAGING} s WHERE NOT EXISTS"
                     " (SELECT 1 FROM readings r WHERE r.device_id = $1 AND r.instance = $3"
                     " AND r.seq = s.seq) ON CONFLICT DO NOTHING")
_INSERT_UNNEST = (
    f"INSERT INTO readings (device_id, instance, {_COLLIST}, received_ms)"
    " SELECT $1, $3, u.*, $2 FROM unnest("
    + ", ".join(f"${i + 4}::{t}[]" for i, t in enumerate(_TYPES))
    + ") AS u ON CONFLICT DO NOTHING")
_INSERT_ONE = (f"INSERT INTO readings (device_id, {_COLLIST}, received_ms) VALUES ("
               + ", ".join(f"${i + 1}" for i in range(len(_COLS) + 2))
               + ") ON CONFLICT DO NOTHING")
_SELECT = ("SELECT device_id, sensor, ts_ms, value, priority, seq, raw_ts_ms, quality,"
           " uncert_ms, agg_rule, agg_fn, agg_window_end_ms, agg_count FROM readings")

Conn = Any  # asyncpg.Connection (or a test double with execute/fetchval)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _row(r: Reading) -> tuple[Any, ...]:
    a = r.agg
    if a is None:
        return (r.seq, r.sensor, r.ts_ms, r.value, int(r.priority), r.quality, r.uncert_ms,
                r.raw_ts_ms, None, None, None, None)
    return (r.seq, r.sensor, r.ts_ms, r.value, int(r.priority), r.quality, r.uncert_ms,
            r.raw_ts_ms, a.rule, a.fn, a.window_end_ms, a.count)


async def _m1_schema(conn: Conn, ctx: dict[str, Any]) -> None:
    ts_ns = ctx.get("timescale")
    # a hypertable's unique keys must contain its time column
    key = "device_id, seq, ts_ms" if ts_ns else "device_id, seq"
    cols = ",\n  ".join(f"{c} {t}" for c, t in zip(_COLS, _TYPES))
    await conn.execute(f"""
CREATE TABLE IF NOT EXISTS readings (
  device_id text NOT NULL,
  {cols},
  received_ms bigint NOT NULL,
  PRIMARY KEY ({key})
);
CREATE INDEX IF NOT EXISTS readings_series ON readings (device_id, sensor, ts_ms);
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
  received_ms bigint NOT NULL
);""")
    for c in ("sensor", "ts_ms", "value"):
        await conn.execute(f"ALTER TABLE readings ALTER COLUMN {c} SET NOT NULL")
    if ts_ns:
        await conn.execute(
            f"SELECT {ts_ns}.create_hypertable('readings', 'ts_ms',"
            " chunk_time_interval => 86400000::bigint, if_not_exists => TRUE)")


async def _m2_streams(conn: Conn, ctx: dict[str, Any]) -> None:
    """Agent instances (streams) and the completeness ledger (cloud.stores.completeness)."""
    # the current key says whether this is a hypertable (whose keys must hold ts_ms)
    cols = await conn.fetchval(
        "SELECT string_agg(a.attname, ',') FROM pg_index i JOIN pg_attribute a"
        " ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
        " WHERE i.indrelid = 'readings'::regclass AND i.indisprimary")
    ts_key = "ts_ms" in str(cols or "").split(",")
    key = "device_id, instance, seq, ts_ms" if ts_key else "device_id, instance, seq"
    await conn.execute("ALTER TABLE readings ADD COLUMN IF NOT EXISTS instance text"
                       " NOT NULL DEFAULT ''")
    await conn.execute("ALTER TABLE readings DROP CONSTRAINT IF EXISTS readings_pkey")
    await conn.execute(f"ALTER TABLE readings ADD PRIMARY KEY ({key})")
    await conn.execute("ALTER TABLE dead_letters ADD COLUMN IF NOT EXISTS peer text")
    await conn.execute(PG_LEDGER_SCHEMA)


Migration = Callable[[Conn, dict[str, Any]], Awaitable[None]]

#: (version, name, step); append new versions, never edit applied ones
MIGRATIONS: list[tuple[int, str, Migration]] = [
    (1, "readings, idempotency, dead_letters (hypertable when timescaledb)", _m1_schema),
    (2, "agent instances in readings; completeness ledger", _m2_streams),
]


async def migrate(conn: Conn, migrations: Sequence[tuple[int, str, Migration]] = MIGRATIONS,
                  *, timescale: str | None = None,
                  options: tsdb.TimescaleOptions | None = None) -> dict[str, Any]:
    """Apply pending migrations in one transaction; returns facts (``applied``,
    ``hypertable``, and what :func:`cloud.stores.timescale.setup` put in place).

    ``timescale``: schema of a usable timescaledb extension (None: plain tables)."""
    ctx: dict[str, Any] = {"applied": [], "timescale": timescale}
    async with conn.transaction():
        await conn.execute(f"SELECT pg_advisory_xact_lock({_LOCK_KEY})")
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS pymigrate_migrations (version integer PRIMARY KEY,"
            " name text NOT NULL, applied_ms bigint NOT NULL)")
        done = {int(r[0]) for r in await conn.fetch("SELECT version FROM pymigrate_migrations")}
        for version, name, step in migrations:
            if version in done:
                continue
            await step(conn, ctx)
            await conn.execute("INSERT INTO pymigrate_migrations VALUES ($1, $2, $3)",
                               version, name, _now_ms())
            ctx["applied"].append(version)
        ctx["hypertable"] = False
        if timescale is not None:
            schema = str(await conn.fetchval("SELECT current_schema()"))
            ctx["hypertable"] = await tsdb.is_hypertable(conn, schema)
            if ctx["hypertable"]:
                ctx |= await tsdb.setup(conn, timescale, schema,
                                        options or tsdb.TimescaleOptions())
    return ctx


class PostgresStore:
    """Idempotent PostgreSQL/TimescaleDB store over an asyncpg pool.

    ``schema``: tables live there (created if missing; the pool's ``search_path``).
    ``bulk``: ``"copy"`` (COPY into a staging table) or ``"unnest"`` (array insert).
    ``timescale``: ``"auto"``, ``"on"`` or ``"off"`` (module docstring); ``timescale_options``:
    what a hypertable gets (:class:`cloud.stores.timescale.TimescaleOptions`).
    """

    name = "postgres"

    def __init__(self, dsn: str, *, schema: str = "public", pool_min: int = 1,
                 pool_max: int = 4, bulk: str = "copy", command_timeout_s: float = 30.0,
                 connect_timeout_s: float = 5.0, application_name: str = "pymigrate-ingest",
                 timescale: str = "auto",
                 timescale_options: tsdb.TimescaleOptions | None = None) -> None:
        if not _IDENT.match(schema):
            raise ValueError(f"schema {schema!r} is not a plain SQL identifier")
        if bulk not in ("copy", "unnest"):
            raise ValueError("bulk must be 'copy' or 'unnest'")
        if timescale not in TIMESCALE_MODES:
            raise ValueError("timescale must be 'auto', 'on' or 'off'")
        self.timescale = timescale
        self.timescale_options = timescale_options or tsdb.TimescaleOptions()
        self.timescale_schema: str | None = None  # the extension's schema when in use
        self.timescale_facts: dict[str, Any] = {}
        self.dsn = dsn
        self.schema = schema
        self.pool_min, self.pool_max = pool_min, pool_max
        self.bulk = bulk
        self.command_timeout_s = command_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.application_name = application_name
        self.hypertable = False
        self.copy_fallbacks = 0  # COPY hit the unique key: staged upsert used (counter)
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        try:
            conn = await asyncpg.connect(self.dsn, timeout=self.connect_timeout_s)
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            raise StoreUnavailable(f"cannot connect to PostgreSQL: {exc}") from exc
        try:
            # IF NOT EXISTS is not safe against a replica creating it at the same moment
            # (a unique violation on pg_namespace): the migration lock serializes it
            async with conn.transaction():
                await conn.execute(f"SELECT pg_advisory_xact_lock({_LOCK_KEY})")
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self.schema}")
            await conn.execute(f"SET search_path TO {self.schema}")
            ts, why = (None, "") if self.timescale == "off" else await tsdb.probe(conn)
            if ts is None and self.timescale == "on":
                raise ConfigError("cloud.postgres.timescale",
                                  f"'on' but TimescaleDB cannot be used: {why}; set it to"
                                  " 'auto' or 'off' to store in plain PostgreSQL tables")
            facts = await migrate(conn, timescale=ts, options=self.timescale_options)
            self.hypertable = bool(facts["hypertable"])
            if ts is not None and not self.hypertable:
                why = (f"table {self.schema}.readings exists as a plain table (created"
                       " without TimescaleDB); it stays one")
                if self.timescale == "on":
                    raise ConfigError("cloud.postgres.timescale",
                                      f"'on' but {why}: use a new schema, convert it with"
                                      " create_hypertable(..., migrate_data => true), or"
                                      " set it to 'auto' or 'off'")
            if self.timescale == "auto" and not self.hypertable:
                log.warning("TimescaleDB not used: plain PostgreSQL tables", reason=why,
                            setting="cloud.postgres.timescale",
                            hint="set timescale = 'off' to store in plain tables silently")
            self.timescale_schema = ts if self.hypertable else None
            self.timescale_facts = {k: v for k, v in facts.items() if k not in (
                "applied", "timescale")}
        finally:
            await conn.close()
        self._pool = await asyncpg.create_pool(
            self.dsn, min_size=self.pool_min, max_size=self.pool_max,
            command_timeout=self.command_timeout_s, timeout=self.connect_timeout_s,
            server_settings={"search_path": self.schema,
                             "application_name": self.application_name})

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("store is not open")
        return self._pool

    async def write(self, device_id: str, batch_id: str, readings: Sequence[Reading],
                    *, admit: Admit | None = None, meta: Any = None) -> WriteResult:
        validate(device_id, readings)
        meta = meta or BatchMeta()
        inst = meta.instance
        key = stream_key(device_id, inst)
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                state, first = await pg_lock_state(conn, key)
                now = _now_ms()
                plan = await plan_batch(
                    state, readings, meta, admit, now_ms=now,
                    digests=lambda f: pg_digests(conn, device_id, inst, f),
                    gap_runs=lambda lo, hi: pg_gap_runs(conn, device_id, inst, lo, hi))
                written = 0
                if plan.delete:
                    await pg_replace_out(conn, plan.delete, now)
                if plan.write:
                    # a device without a state row on a hypertable: nothing vouches that
                    # its seqs are new at other timestamps (state lost): check each
                    written = await self._insert(conn, device_id, plan.write,
                                                 guard=first and self.hypertable,
                                                 instance=inst)
                if plan.state is not None:
                    await conn.execute(
                        "UPDATE idempotency SET state = $2, updated_ms = $3 WHERE device_id = $1",
                        key, plan.state.to_bytes(), now)
                await pg_save_ledger(conn, device_id, batch_id, meta, plan, now)
        except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError) as exc:
            raise StoreRejected(f"PostgreSQL refused the data: {exc}",
                                reason=f"pg_{exc.sqlstate}") from exc
        except (_ClientDataError, OverflowError, UnicodeEncodeError) as exc:
            # asyncpg could not encode a value for its column (e.g. int32 overflow)
            raise StoreRejected(f"value does not fit its column: {exc}",
                                reason="pg_encode") from exc
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StoreUnavailable(f"PostgreSQL write failed: {type(exc).__name__}: {exc}",
                                   batch_id=batch_id) from exc
        return WriteResult(written=written,
                           duplicates=plan.duplicates + len(plan.write) - written,
                           gateway_dropped=len(plan.skipped), replaced=len(plan.delete),
                           conflicts=plan.conflicted, gaps=len(plan.gaps), late=plan.late)

    async def completeness(self, device_id: str | None = None) -> list[StreamReport]:
        """The completeness report of every stream (of one device)."""
        async with self.pool.acquire() as conn:
            return await pg_completeness(conn, device_id)

    async def _insert(self, conn: Conn, device_id: str, rs: list[Reading], *,
                      guard: bool = False, instance: str = "") -> int:
        """Insert ``rs``; returns rows written. ``guard``: go straight to the staged
        insert that skips any stored (device_id, seq)."""
        now = _now_ms()
        own = [r for r in rs if r.device_id == device_id]
        written = 0
        for r in rs:  # merged copies of other gateways' readings (average policy): rare
            if r.device_id != device_id:
                status = await conn.execute(_INSERT_ONE, r.device_id, *_row(r), now)
                written += int(status.rsplit(" ", 1)[1])
        if not own:
            return written
        if self.bulk == "unnest" and not guard:
            cols: list[list[Any]] = [list(c) for c in zip(*(_row(r) for r in own))]
            status = await conn.execute(_INSERT_UNNEST, device_id, now, instance, *cols)
            return written + int(status.rsplit(" ", 1)[1])
        records = [(device_id, instance, *_row(r), now) for r in own]
        if not guard:
            try:
                # the idempotency state (locked) says these are new: COPY straight in;
                # the unique key still guards, and a hit (state lost, restored backup)
                # falls back to the staged upsert below
                async with conn.transaction():
                    await conn.copy_records_to_table("readings", records=records,
                                                     columns=_ALLCOLS)
                return written + len(own)
            except asyncpg.UniqueViolationError:
                self.copy_fallbacks += 1
        await conn.execute(_CREATE_STAGING)
        await conn.copy_records_to_table(_STAGING, records=[r[2:-1] for r in records],
                                         columns=_COLS)
        # one staged insert per transaction; ON COMMIT DELETE ROWS empties the table
        status = await conn.execute(
            _INSERT_STAGED_HT if self.hypertable else _INSERT_STAGED, device_id, now, instance)
        return written + int(status.rsplit(" ", 1)[1])

    async def dead_letter(self, device_id: str, batch_id: str, reason: str,
                          payload: bytes, *, peer: str = "") -> None:
        try:
            await pg_dead_letter(self.pool, device_id, batch_id, reason, payload, peer)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StoreUnavailable(f"dead-letter write failed: {exc}") from exc

    async def dead_letters(self, limit: int = 100) -> list[tuple[str, str, str]]:
        return await pg_dead_letters(self.pool, limit)

    async def idempotency_state(self, device_id: str, instance: str = "") -> IdempotencyState:
        return await pg_idempotency_state(self.pool, device_id, instance)

    async def query(self, device_id: str, sensor: str | None = None,
                    start_ms: int | None = None, end_ms: int | None = None) -> list[Reading]:
        sql = _SELECT + " WHERE device_id = $1"
        args: list[Any] = [device_id]
        for cond, val in (("sensor = ", sensor), ("ts_ms >= ", start_ms), ("ts_ms < ", end_ms)):
            if val is not None:
                args.append(val)
                sql += f" AND {cond}${len(args)}"
        sql += " ORDER BY sensor, ts_ms, seq"
        return [row_to_reading(tuple(r)) for r in await self.pool.fetch(sql, *args)]

    async def count(self, device_id: str | None = None) -> int:
        if device_id is None:
            return int(await self.pool.fetchval("SELECT count(*) FROM readings"))
        return int(await self.pool.fetchval(
            "SELECT count(*) FROM readings WHERE device_id = $1", device_id))

    async def aggregate(self, device_id: str, sensor: str | None, start_ms: int | None,
                        end_ms: int | None, bucket_ms: int) -> list[AggregateRow]:
        """Per sensor and ``bucket_ms`` bucket (aligned to the epoch; the window widened
        to whole buckets): min, max, avg, sum, count of ``value``. Hourly buckets on
        TimescaleDB read the continuous aggregate ``readings_1h`` (refreshed over the
        window first: exact); anything else is one GROUP BY over ``readings``."""
        if bucket_ms <= 0:
            raise ValueError("bucket_ms must be > 0")
        ts = self.timescale_schema
        if (ts is not None and bucket_ms == tsdb.HOUR_MS
                and self.timescale_facts.get("aggregate")):
            async with self.pool.acquire() as conn:
                rows = await tsdb.read_hourly(conn, ts, self.schema, device_id, sensor,
                                              start_ms, end_ms)
        else:
            s, e = tsdb.bucket_window(start_ms, end_ms, bucket_ms)
            bucket = "(ts_ms - ((ts_ms % $2) + $2) % $2)"
            sql = (f"SELECT sensor, {bucket} AS bucket_ms, min(value), max(value), avg(value),"
                   " sum(value), count(*) FROM readings WHERE device_id = $1")
            args: list[Any] = [device_id, bucket_ms]
            for cond, val in (("sensor = ", sensor), ("ts_ms >= ", s), ("ts_ms < ", e)):
                if val is not None:
                    args.append(val)
                    sql += f" AND {cond}${len(args)}"
            sql += " GROUP BY sensor, bucket_ms ORDER BY sensor, bucket_ms"
            rows = [tuple(r) for r in await self.pool.fetch(sql, *args)]
        return [AggregateRow(str(r[0]), int(r[1]), float(r[2]), float(r[3]), float(r[4]),
                             float(r[5]), int(r[6])) for r in rows]
