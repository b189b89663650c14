"""TimescaleDB on top of the PostgreSQL store: whether it can be used, and what a
hypertable gets (compression, retention, an hourly continuous aggregate).

:func:`probe` answers "can this server run TimescaleDB for us?" without ever breaking
the caller's connection: the extension must be created in the database already, or be
packaged *and* preloaded (``shared_preload_libraries``) so ``CREATE EXTENSION`` works.
An extension that is packaged but not preloaded is the trap: its ``CREATE EXTENSION``
raises a FATAL error that closes the connection (and with it any transaction around it),
so the probe never tries it and reports the reason instead. The loader registers its
``timescaledb.*`` settings at server start only when preloaded, which ``pg_settings``
shows to any user.

:func:`setup` runs at every open, inside the migration transaction and its advisory
lock, and is idempotent; it converges the hypertable on the configured
:class:`TimescaleOptions`:

- ``pymigrate_now_ms()`` as the hypertable's integer-now function (``ts_ms`` is integer
  milliseconds, and policies need "now" in the same unit);
- compression segmented by ``device_id, sensor`` and ordered by ``ts_ms, seq`` (the
  unique key's columns must be segment-by or order-by columns), and a compression policy
  ``compress_after_ms`` behind now (0: no policy);
- a retention policy dropping chunks older than ``retention_ms`` (0: keep everything);
- the continuous aggregate ``readings_1h``: per device, sensor and hour (``bucket_ms``,
  aligned to the epoch) the ``min, max, avg, sum, count`` of ``value``, real-time
  (``materialized_only = false``: buckets not materialized yet are computed from the raw
  rows), refreshed by a policy every ``aggregate_refresh_s``. Readings arriving late (a
  device's backlog) land below the materialized watermark and only show after a refresh:
  :func:`read_hourly` refreshes the window it reads first, so what it returns is exact.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

__all__ = ["HOUR_MS", "TimescaleOptions", "compress_all", "probe", "read_hourly", "setup",
           "storage_bytes"]

HOUR_MS = 3_600_000
CAGG = "readings_1h"
NOW_FN = "pymigrate_now_ms"

Conn = Any


class TimescaleOptions(msgspec.Struct, frozen=True):
    """What a hypertable gets; see the module docstring."""

    chunk_interval_ms: int = 86_400_000
    compress_after_ms: int = 7 * 86_400_000
    retention_ms: int = 0
    aggregate: bool = True
    aggregate_refresh_s: int = 300


async def _ext_schema(conn: Conn) -> str | None:
    ns = await conn.fetchval(
        "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace"
        " WHERE e.extname = 'timescaledb'")
    return str(ns) if ns else None


async def probe(conn: Conn) -> tuple[str | None, str]:
    """``(schema of the extension, "")`` when TimescaleDB can be used (creating the
    extension when it is preloaded but not created yet), else ``(None, reason)``."""
    preloaded = bool(await conn.fetchval(
        "SELECT count(*) FROM pg_settings WHERE name LIKE 'timescaledb.%'"))
    ns = await _ext_schema(conn)
    if ns is not None:
        if not preloaded:
            return None, ("the timescaledb extension exists in this database but the server"
                          " does not preload it (shared_preload_libraries)")
        return ns, ""
    available = await conn.fetchval(
        "SELECT default_version FROM pg_available_extensions WHERE name = 'timescaledb'")
    if not available:
        return None, "the timescaledb extension is not installed on the server"
    if not preloaded:
        # CREATE EXTENSION would fail with FATAL and close this connection
        return None, (f"timescaledb {available} is installed but not preloaded: add it to"
                      " shared_preload_libraries in postgresql.conf and restart the server")
    import asyncpg

    try:
        async with conn.transaction():  # a savepoint inside the caller's transaction
            await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    except asyncpg.PostgresError as exc:
        return None, f"CREATE EXTENSION timescaledb failed: {exc}"
    ns = await _ext_schema(conn)
    return (ns, "") if ns else (None, "CREATE EXTENSION timescaledb created nothing")


async def is_hypertable(conn: Conn, schema: str) -> bool:
    return bool(await conn.fetchval(
        "SELECT count(*) FROM timescaledb_information.hypertables"
        " WHERE hypertable_schema = $1 AND hypertable_name = 'readings'", schema))


async def _job(conn: Conn, proc: str, schema: str, name: str) -> tuple[int, dict[str, Any]] | None:
    row = await conn.fetchrow(
        "SELECT job_id, config FROM timescaledb_information.jobs WHERE proc_name = $1"
        " AND hypertable_schema = $2 AND hypertable_name = $3", proc, schema, name)
    if row is None:
        return None
    cfg = row[1]
    return int(row[0]), (json.loads(cfg) if isinstance(cfg, str) else dict(cfg or {}))


async def setup(conn: Conn, ts: str, schema: str, opts: TimescaleOptions) -> dict[str, Any]:
    """Converge ``readings`` (a hypertable) on ``opts``; returns what is in place."""
    await conn.execute(
        f"CREATE OR REPLACE FUNCTION {schema}.{NOW_FN}() RETURNS bigint LANGUAGE sql STABLE"
        " AS $$ SELECT (extract(epoch FROM now()) * 1000)::bigint $$")
    await conn.execute(f"SELECT {ts}.set_integer_now_func('{schema}.readings',"
                       f" '{schema}.{NOW_FN}', replace_if_exists => true)")
    await conn.execute(f"SELECT {ts}.set_chunk_time_interval('{schema}.readings',"
                       f" {int(opts.chunk_interval_ms)}::bigint)")
    compressed = bool(await conn.fetchval(
        "SELECT count(*) FROM timescaledb_information.compression_settings"
        " WHERE hypertable_schema = $1 AND hypertable_name = 'readings'", schema))
    if not compressed:
        await conn.execute(
            f"ALTER TABLE {schema}.readings SET (timescaledb.compress,"
            " timescaledb.compress_segmentby = 'device_id, sensor',"
            " timescaledb.compress_orderby = 'ts_ms, seq')")
    await _policy(conn, ts, schema, "readings", "policy_compression", "compress_after",
                  opts.compress_after_ms,
                  f"SELECT {ts}.add_compression_policy('{schema}.readings',"
                  " compress_after => {v}::bigint)",
                  f"SELECT {ts}.remove_compression_policy('{schema}.readings', if_exists => true)")
    await _policy(conn, ts, schema, "readings", "policy_retention", "drop_after",
                  opts.retention_ms,
                  f"SELECT {ts}.add_retention_policy('{schema}.readings',"
                  " drop_after => {v}::bigint)",
                  f"SELECT {ts}.remove_retention_policy('{schema}.readings', if_exists => true)")
    aggregate = False
    if opts.aggregate:
        await conn.execute(
            f"CREATE MATERIALIZED VIEW IF NOT EXISTS {schema}.{CAGG} WITH (timescaledb.continuous,"
            " timescaledb.materialized_only = false) AS SELECT device_id, sensor,"
            f" {ts}.time_bucket({HOUR_MS}::bigint, ts_ms) AS bucket_ms, min(value) AS min,"
            " max(value) AS max, avg(value) AS avg, sum(value) AS sum, count(*) AS count"
            f" FROM {schema}.readings GROUP BY device_id, sensor,"
            f" {ts}.time_bucket({HOUR_MS}::bigint, ts_ms) WITH NO DATA")
        await conn.execute(
            f"SELECT {ts}.add_continuous_aggregate_policy('{schema}.{CAGG}',"
            f" start_offset => NULL, end_offset => {HOUR_MS}::bigint,"
            f" schedule_interval => make_interval(secs => {int(opts.aggregate_refresh_s)}),"
            " if_not_exists => true)")
        aggregate = True
    return {"compression": True, "compress_after_ms": opts.compress_after_ms,
            "retention_ms": opts.retention_ms, "aggregate": aggregate}


async def _policy(conn: Conn, ts: str, schema: str, table: str, proc: str, key: str,
                  value: int, add: str, remove: str) -> None:
    """Make the policy ``proc`` hold ``key = value`` (0: no policy)."""
    job = await _job(conn, proc, schema, table)
    if job is not None and value and int(job[1].get(key) or -1) == value:
        return
    if job is not None:
        await conn.execute(remove)
    if value:
        await conn.execute(add.replace("{v}", str(int(value))))


def bucket_window(start_ms: int | None, end_ms: int | None,
                  bucket_ms: int) -> tuple[int | None, int | None]:
    """``[start, end)`` widened to whole buckets (floor start, ceil end)."""
    s = None if start_ms is None else start_ms - start_ms % bucket_ms
    e = None if end_ms is None else -((-end_ms) // bucket_ms) * bucket_ms
    return s, e


async def read_hourly(conn: Conn, ts: str, schema: str, device_id: str, sensor: str | None,
                      start_ms: int | None, end_ms: int | None) -> list[tuple[Any, ...]]:
    """Rows ``(sensor, bucket_ms, min, max, avg, sum, count)`` of the continuous aggregate
    after refreshing the (bucket-aligned) window, so late readings are counted.
    Runs outside a transaction (a refresh cannot run inside one)."""
    import asyncio

    import asyncpg

    s, e = bucket_window(start_ms, end_ms, HOUR_MS)
    if s is None or e is None:  # open ends: the device's own data bounds them
        lo, hi = await conn.fetchrow(
            f"SELECT min(ts_ms), max(ts_ms) FROM {schema}.readings WHERE device_id = $1",
            device_id)
        if lo is not None:
            s = bucket_window(int(lo), None, HOUR_MS)[0] if s is None else s
            e = bucket_window(None, int(hi) + 1, HOUR_MS)[1] if e is None else e
    if s is not None and e is not None and e > s:
        for attempt in range(20):
            try:
                await conn.execute(f"CALL {ts}.refresh_continuous_aggregate('{schema}.{CAGG}',"
                                   f" {int(s)}::bigint, {int(e)}::bigint)")
                break
            except asyncpg.LockNotAvailableError:  # the refresh policy is at it right now
                if attempt == 19:
                    raise
                await asyncio.sleep(0.1)
    sql = (f"SELECT sensor, bucket_ms, min, max, avg, sum, count FROM {schema}.{CAGG}"
           " WHERE device_id = $1")
    args: list[Any] = [device_id]
    for cond, val in (("sensor = ", sensor), ("bucket_ms >= ", s), ("bucket_ms < ", e)):
        if val is not None:
            args.append(val)
            sql += f" AND {cond}${len(args)}"
    return [tuple(r) for r in await conn.fetch(sql + " ORDER BY sensor, bucket_ms", *args)]


async def drop_schema(conn: Conn, schema: str, *, attempts: int = 20) -> None:
    """Drop a schema holding a hypertable (tests, benchmarks): its background jobs are
    deleted first, and a drop that races a job still running is tried again."""
    import asyncio

    import asyncpg

    for attempt in range(attempts):
        try:
            if await conn.fetchval("SELECT count(*) FROM pg_extension"
                                   " WHERE extname = 'timescaledb'"):
                await conn.execute(
                    "SELECT delete_job(j.job_id) FROM timescaledb_information.jobs j"
                    " LEFT JOIN timescaledb_information.continuous_aggregates c"
                    " ON c.materialization_hypertable_schema = j.hypertable_schema"
                    " AND c.materialization_hypertable_name = j.hypertable_name"
                    " WHERE j.hypertable_schema = $1 OR c.view_schema = $1", schema)
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            return
        except (asyncpg.InternalServerError, asyncpg.LockNotAvailableError,
                asyncpg.DeadlockDetectedError, asyncpg.QueryCanceledError):
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(0.2)


async def compress_all(conn: Conn, ts: str, schema: str) -> int:
    """Compress every chunk not compressed yet (what the policy does when chunks age);
    returns how many were compressed."""
    rows = await conn.fetch(
        f"SELECT {ts}.compress_chunk(c, if_not_compressed => true)"
        f" FROM {ts}.show_chunks('{schema}.readings') c")
    return len(rows)


async def storage_bytes(conn: Conn, ts: str, schema: str) -> dict[str, int]:
    """On-disk bytes of the hypertable (tables, indexes, TOAST of every chunk) and, when
    chunks were compressed, the same before/after compression of those chunks."""
    total = int(await conn.fetchval(f"SELECT {ts}.hypertable_size('{schema}.readings')") or 0)
    row = await conn.fetchrow(
        "SELECT number_compressed_chunks, before_compression_total_bytes,"
        f" after_compression_total_bytes FROM {ts}.hypertable_compression_stats("
        f"'{schema}.readings')")
    out = {"total_bytes": total}
    if row is not None and row[0]:
        out |= {"compressed_chunks": int(row[0]), "before_compression_bytes": int(row[1]),
                "after_compression_bytes": int(row[2])}
    return out
