"""PostgreSQL migrations and the TimescaleDB probe over a scripted connection: which SQL
runs for each server situation (the real servers run in
tests/integration/test_store_postgres.py and test_store_timescale.py)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from cloud.stores.postgres import MIGRATIONS, migrate
from cloud.stores.timescale import bucket_window, probe


class FakeConn:
    def __init__(self, *, installed: str | None = None, available: bool = False,
                 preloaded: bool = False, create_fails: bool = False,
                 applied: tuple[int, ...] = ()) -> None:
        self.installed = installed
        self.available = available
        self.preloaded = preloaded
        self.create_fails = create_fails
        self.applied = list(applied)
        self.sql: list[str] = []

    async def fetchval(self, sql: str, *args: Any) -> Any:
        self.sql.append(sql)
        if "FROM pg_extension e" in sql:
            return self.installed
        if "pg_available_extensions" in sql:
            return "2.28.3" if self.available else None
        if "FROM pg_settings" in sql:
            return 40 if self.preloaded else 0
        if "current_schema()" in sql:
            return "public"
        if "timescaledb_information.hypertables" in sql:
            return 0  # the setup step has its own integration tests
        if "FROM pg_index" in sql:  # the primary key's columns (m2 keeps ts_ms in it)
            ht = any("create_hypertable" in s for s in self.sql)
            return "device_id,seq,ts_ms" if ht else "device_id,seq"
        raise AssertionError(sql)

    async def fetch(self, sql: str, *args: Any) -> list[tuple[int]]:
        self.sql.append(sql)
        return [(v,) for v in self.applied]

    async def execute(self, sql: str, *args: Any) -> str:
        self.sql.append(sql)
        if sql.startswith("CREATE EXTENSION"):
            if self.create_fails:
                raise asyncpg.InsufficientPrivilegeError("permission denied")
            self.installed = "public"
        if sql.startswith("INSERT INTO pymigrate_migrations"):
            self.applied.append(args[0])
        return "OK"

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        yield


def _ddl(conn: FakeConn) -> str:
    return next(s for s in conn.sql if "CREATE TABLE IF NOT EXISTS readings" in s)


async def test_plain_table_without_timescale() -> None:
    conn = FakeConn()
    facts = await migrate(conn)
    assert facts == {"applied": [1, 2], "timescale": None, "hypertable": False}
    assert "PRIMARY KEY (device_id, seq)" in _ddl(conn)
    # version 2: each agent instance is its own stream of sequence numbers
    assert "ALTER TABLE readings ADD PRIMARY KEY (device_id, instance, seq)" in conn.sql
    assert not any("create_hypertable" in s for s in conn.sql)
    assert conn.sql[0].startswith("SELECT pg_advisory_xact_lock(")


async def test_hypertable_with_timescale() -> None:
    conn = FakeConn(installed="tsdb", preloaded=True)
    await migrate(conn, timescale="tsdb")
    assert "PRIMARY KEY (device_id, seq, ts_ms)" in _ddl(conn)  # must hold the time column
    assert "ALTER TABLE readings ADD PRIMARY KEY (device_id, instance, seq, ts_ms)" in conn.sql
    (ht,) = [s for s in conn.sql if "create_hypertable" in s]
    assert ht.startswith("SELECT tsdb.create_hypertable('readings', 'ts_ms'")
    assert "chunk_time_interval => 86400000" in ht


async def test_probe_not_preloaded_never_creates_the_extension() -> None:
    """CREATE EXTENSION of a not-preloaded timescaledb is a FATAL error that closes the
    connection: the probe must not try it."""
    conn = FakeConn(available=True)
    ts, why = await probe(conn)
    assert ts is None and "not preloaded" in why and "shared_preload_libraries" in why
    assert not any(s.startswith("CREATE EXTENSION") for s in conn.sql)


@pytest.mark.parametrize(("kw", "want", "why"), [
    ({}, None, "not installed"),
    ({"available": True, "preloaded": True}, "public", ""),
    ({"available": True, "preloaded": True, "create_fails": True}, None, "permission denied"),
    ({"installed": "tsdb", "preloaded": True}, "tsdb", ""),
    ({"installed": "tsdb"}, None, "does not preload"),
])
async def test_probe_cases(kw: dict[str, Any], want: str | None, why: str) -> None:
    ts, reason = await probe(FakeConn(**kw))
    assert ts == want and why in reason and (reason == "") == (want is not None)


async def test_applied_versions_are_skipped() -> None:
    conn = FakeConn(applied=tuple(v for v, _, _ in MIGRATIONS))
    facts = await migrate(conn)
    assert facts["applied"] == [] and facts["hypertable"] is False
    assert not any("CREATE TABLE IF NOT EXISTS readings" in s for s in conn.sql)


@pytest.mark.parametrize("version", [v for v, _, _ in MIGRATIONS])
def test_versions_unique_and_ordered(version: int) -> None:
    versions = [v for v, _, _ in MIGRATIONS]
    assert versions == sorted(set(versions)) and version >= 1


def test_bucket_window_widens_to_whole_buckets() -> None:
    assert bucket_window(3_600_005, 7_199_999, 3_600_000) == (3_600_000, 7_200_000)
    assert bucket_window(-1, 0, 3_600_000) == (-3_600_000, 0)
    assert bucket_window(None, None, 60_000) == (None, None)
