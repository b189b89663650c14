"""PostgreSQL migrations and TimescaleDB detection over a scripted connection (the real
server here has no timescaledb, so the hypertable path is exercised against this fake;
the plain-table path runs against the real server in the integration tests)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from cloud.stores.postgres import MIGRATIONS, detect_timescale, migrate


class FakeConn:
    def __init__(self, *, installed: str | None = None, available: bool = False,
                 create_fails: bool = False, applied: tuple[int, ...] = ()) -> None:
        self.installed = installed
        self.available = available
        self.create_fails = create_fails
        self.applied = list(applied)
        self.sql: list[str] = []

    async def fetchval(self, sql: str, *args: Any) -> Any:
        self.sql.append(sql)
        if "FROM pg_extension e" in sql:
            return self.installed
        if "pg_available_extensions" in sql:
            return int(self.available)
        if "FROM pg_extension WHERE" in sql:
            return int(self.installed is not None)
        raise AssertionError(sql)

    async def fetch(self, sql: str, *args: Any) -> list[tuple[int]]:
        self.sql.append(sql)
        return [(v,) for v in self.applied]

    async def execute(self, sql: str, *args: Any) -> str:
        self.sql.append(sql)
        if sql.startswith("CREATE EXTENSION"):
            if self.create_fails:
                raise asyncpg.FeatureNotSupportedError("timescaledb must be preloaded")
            self.installed = "public"
        if sql.startswith("INSERT INTO pymigrate_migrations"):
            self.applied.append(args[0])
        return "OK"

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        yield


def _ddl(conn: FakeConn) -> str:
    return next(s for s in conn.sql if "CREATE TABLE IF NOT EXISTS readings" in s)


async def test_plain_table_without_extension() -> None:
    conn = FakeConn()
    facts = await migrate(conn)
    assert facts == {"applied": [1], "hypertable": False}
    assert "PRIMARY KEY (device_id, seq)" in _ddl(conn)
    assert not any("create_hypertable" in s for s in conn.sql)
    assert conn.sql[0].startswith("SELECT pg_advisory_xact_lock(")


async def test_hypertable_when_extension_available() -> None:
    conn = FakeConn(available=True)
    facts = await migrate(conn)
    assert facts["hypertable"] is True
    assert "PRIMARY KEY (device_id, seq, ts_ms)" in _ddl(conn)  # must hold the time column
    (ht,) = [s for s in conn.sql if "create_hypertable" in s]
    assert ht.startswith("SELECT public.create_hypertable('readings', 'ts_ms'")
    assert "chunk_time_interval => 86400000" in ht


async def test_extension_packaged_but_not_loadable_falls_back() -> None:
    conn = FakeConn(available=True, create_fails=True)
    assert await detect_timescale(conn) is None
    facts = await migrate(FakeConn(available=True, create_fails=True))
    assert facts["hypertable"] is False


async def test_already_installed_in_other_schema() -> None:
    conn = FakeConn(installed="tsdb")
    assert await detect_timescale(conn) == "tsdb"
    await migrate(conn)
    assert any(s.startswith("SELECT tsdb.create_hypertable(") for s in conn.sql)


async def test_applied_versions_are_skipped() -> None:
    conn = FakeConn(installed="public", applied=tuple(v for v, _, _ in MIGRATIONS))
    facts = await migrate(conn)
    assert facts == {"applied": [], "hypertable": True}
    assert not any("CREATE TABLE IF NOT EXISTS readings" in s for s in conn.sql)


@pytest.mark.parametrize("version", [v for v, _, _ in MIGRATIONS])
def test_versions_unique_and_ordered(version: int) -> None:
    versions = [v for v, _, _ in MIGRATIONS]
    assert versions == sorted(set(versions)) and version >= 1
