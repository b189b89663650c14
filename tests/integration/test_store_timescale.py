"""TimescaleDB as users run it, against real servers:

- the machine's default cluster (5432, ``postgres_dsn``) has the extension *installed but
  not preloaded* once ``make timescaledb`` ran (it installs into the shared PostgreSQL 15
  lib dir): ``timescale = "auto"`` falls back to plain tables with one warning, ``"on"``
  fails naming the key, ``"off"`` never looks;
- the separate cluster ``make timescaledb`` starts (``PYMIGRATE_TEST_TSDB``, preloaded):
  hypertable, compression, retention, the hourly continuous aggregate, exactly once
  (also into compressed chunks, and when the idempotency state is lost).

Each test works in its own schema, dropped afterwards."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import msgspec
import pytest
from structlog.testing import capture_logs

from cloud.ingest import IngestService
from cloud.stores import timescale as tsdb
from cloud.stores.postgres import PostgresStore
from pymigrate.errors import ConfigError
from pymigrate.types import Reading
from tests.conftest import REQUIRE, require_service
from tests.unit import cloud_contract as contract
from tests.unit.cloud_helpers import T0, incoming, make_readings, payload

pytestmark = pytest.mark.integration
HOUR = tsdb.HOUR_MS


@pytest.fixture
def tsdb_dsn() -> str:
    dsn = os.environ.get("PYMIGRATE_TEST_TSDB", "")
    if not dsn:
        msg = "PYMIGRATE_TEST_TSDB is not set (run `make timescaledb` and export its DSN)"
        if REQUIRE:
            pytest.fail(f"{msg}; required in CI")
        pytest.skip(msg)
    u = urlsplit(dsn)
    require_service("TimescaleDB", u.hostname or "127.0.0.1", u.port or 5432)
    return dsn


async def _drop(dsn: str, schema: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await tsdb.drop_schema(conn, schema)  # its background jobs may be running
    finally:
        await conn.close()


@pytest.fixture
async def schemas() -> AsyncIterator[list[tuple[str, str]]]:
    made: list[tuple[str, str]] = []  # (dsn, schema) to drop
    yield made
    for dsn, name in made:
        await _drop(dsn, name)


def _schema(made: list[tuple[str, str]], dsn: str) -> str:
    name = f"pm_ts_{uuid.uuid4().hex[:10]}"
    made.append((dsn, name))
    return name


def factory(dsn: str, schema: str, **kw: Any) -> contract.StoreFactory:
    async def make() -> PostgresStore:
        s = PostgresStore(dsn, schema=schema, **kw)
        await s.open()
        return s
    return make


# -- installed but not preloaded (the default cluster) ---------------------------------------
@pytest.fixture
async def not_preloaded(postgres_dsn: str) -> str:
    require_service("PostgreSQL", "127.0.0.1", 5432)
    conn = await asyncpg.connect(postgres_dsn)
    try:
        avail = await conn.fetchval(
            "SELECT count(*) FROM pg_available_extensions WHERE name = 'timescaledb'")
        loaded = await conn.fetchval(
            "SELECT count(*) FROM pg_settings WHERE name LIKE 'timescaledb.%'")
    finally:
        await conn.close()
    if not avail or loaded:
        msg = ("the default cluster does not have timescaledb installed-but-not-preloaded"
               " (`make timescaledb` installs it there)")
        if REQUIRE:
            pytest.fail(msg)
        pytest.skip(msg)
    return postgres_dsn


async def test_auto_falls_back_with_one_warning_when_not_preloaded(
        not_preloaded: str, schemas: list[tuple[str, str]]) -> None:
    schema = _schema(schemas, not_preloaded)
    with capture_logs() as logs:
        store = await factory(not_preloaded, schema)()
    try:
        warnings = [e for e in logs if e["log_level"] == "warning"]
        assert len(warnings) == 1
        assert "not preloaded" in warnings[0]["reason"]
        assert warnings[0]["setting"] == "cloud.postgres.timescale"
        assert store.hypertable is False
        ack = await IngestService(store).handle(incoming(payload("d", make_readings("d", 50))))
        assert (ack.status, ack.accepted) == ("ok", 50)
    finally:
        await store.close()
    with capture_logs() as logs:  # a restart warns again (once), and still works
        store = await factory(not_preloaded, schema)()
    await store.close()
    assert len([e for e in logs if e["log_level"] == "warning"]) == 1


async def test_on_fails_naming_the_key_when_not_preloaded(
        not_preloaded: str, schemas: list[tuple[str, str]]) -> None:
    with pytest.raises(ConfigError) as err:
        await factory(not_preloaded, _schema(schemas, not_preloaded), timescale="on")()
    assert err.value.key == "cloud.postgres.timescale"
    assert "shared_preload_libraries" in str(err.value)


async def test_off_never_probes(not_preloaded: str, schemas: list[tuple[str, str]],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    async def boom(conn: Any) -> tuple[str | None, str]:
        raise AssertionError("probed with timescale = 'off'")

    monkeypatch.setattr(tsdb, "probe", boom)
    with capture_logs() as logs:
        store = await factory(not_preloaded, _schema(schemas, not_preloaded),
                              timescale="off")()
    try:
        assert store.hypertable is False and logs == []
    finally:
        await store.close()


# -- a real TimescaleDB -----------------------------------------------------------------------
async def _jobs(store: PostgresStore) -> dict[str, dict[str, Any]]:
    import json

    rows = await store.pool.fetch(
        "SELECT proc_name, config FROM timescaledb_information.jobs"
        " WHERE hypertable_schema = $1 AND hypertable_name = 'readings'", store.schema)
    return {r[0]: json.loads(r[1]) for r in rows}


async def test_hypertable_compression_retention_aggregate(
        tsdb_dsn: str, schemas: list[tuple[str, str]]) -> None:
    schema = _schema(schemas, tsdb_dsn)
    with capture_logs() as logs:
        store = await factory(tsdb_dsn, schema, timescale="on")()
    try:
        assert logs == [] and store.hypertable is True
        dim = await store.pool.fetchrow(
            "SELECT column_name, integer_now_func, integer_interval FROM"
            " timescaledb_information.dimensions WHERE hypertable_schema = $1", schema)
        assert tuple(dim) == ("ts_ms", "pymigrate_now_ms", 86_400_000)
        settings = {r[0]: (r[1], r[2]) for r in await store.pool.fetch(
            "SELECT attname, segmentby_column_index, orderby_column_index FROM"
            " timescaledb_information.compression_settings WHERE hypertable_schema = $1",
            schema)}
        assert settings == {"device_id": (1, None), "sensor": (2, None), "ts_ms": (None, 1),
                            "seq": (None, 2)}
        jobs = await _jobs(store)
        assert jobs["policy_compression"]["compress_after"] == 7 * 86_400_000
        assert "policy_retention" not in jobs
        cagg = await store.pool.fetchval(
            "SELECT materialized_only FROM timescaledb_information.continuous_aggregates"
            " WHERE view_schema = $1 AND view_name = 'readings_1h'", schema)
        assert cagg is False  # real time: recent buckets come from the raw rows
    finally:
        await store.close()
    # a restart with other settings converges on them (and is otherwise a no-op)
    opts = tsdb.TimescaleOptions(compress_after_ms=HOUR, retention_ms=30 * 86_400_000)
    store = await factory(tsdb_dsn, schema, timescale_options=opts)()
    try:
        jobs = await _jobs(store)
        assert jobs["policy_compression"]["compress_after"] == HOUR
        assert jobs["policy_retention"]["drop_after"] == 30 * 86_400_000
    finally:
        await store.close()
    store = await factory(tsdb_dsn, schema)()  # back to defaults: retention removed
    try:
        assert "policy_retention" not in await _jobs(store)
    finally:
        await store.close()


async def test_on_refuses_a_plain_table(tsdb_dsn: str, schemas: list[tuple[str, str]]) -> None:
    schema = _schema(schemas, tsdb_dsn)
    await (await factory(tsdb_dsn, schema, timescale="off")()).close()
    with pytest.raises(ConfigError) as err:
        await factory(tsdb_dsn, schema, timescale="on")()
    assert err.value.key == "cloud.postgres.timescale" and "plain table" in str(err.value)
    with capture_logs() as logs:
        store = await factory(tsdb_dsn, schema)()  # auto: stays plain, says so once
    await store.close()
    assert store.hypertable is False
    assert [e["log_level"] for e in logs] == ["warning"]


@pytest.mark.parametrize("bulk", ["copy", "unnest"])
async def test_resend_written_once_across_restart(tsdb_dsn: str, bulk: str,
                                                  schemas: list[tuple[str, str]]) -> None:
    await contract.check_resend_written_once(
        factory(tsdb_dsn, _schema(schemas, tsdb_dsn), bulk=bulk, timescale="on"), "dev-a")


async def test_overlap_out_of_order_and_race(tsdb_dsn: str,
                                             schemas: list[tuple[str, str]]) -> None:
    make = factory(tsdb_dsn, _schema(schemas, tsdb_dsn), timescale="on")
    await contract.check_overlap_and_out_of_order(make, "dev-b")
    await contract.check_replicas_race(make, "race-", devices=3, batches=6, per_batch=200)
    await contract.check_malformed_dead_lettered(make, "dev-m")


async def test_exactly_once_into_compressed_chunks_and_without_state(
        tsdb_dsn: str, schemas: list[tuple[str, str]]) -> None:
    """Resends land on compressed chunks (a backlog arriving after compression); with the
    idempotency state lost, neither an exact resend nor the same seqs at other
    timestamps are stored again: (device_id, seq) stays unique on the hypertable."""
    store = await factory(tsdb_dsn, _schema(schemas, tsdb_dsn), timescale="on")()
    try:
        svc = IngestService(store)
        rs = make_readings("d", 600)
        assert (await svc.handle(incoming(payload("d", rs[:400]), "d"))).accepted == 400
        assert await tsdb.compress_all(store.pool, "public", store.schema) >= 1
        ack = await svc.handle(incoming(payload("d", rs, "b2"), "d"))  # 400 old + 200 new
        assert (ack.accepted, ack.duplicates) == (200, 400)
        assert await store.count("d") == 600
        # state lost (row deleted): the same seqs again, once exact, once shifted in time
        await store.pool.execute("DELETE FROM idempotency")
        shifted = [msgspec.structs.replace(r, ts_ms=r.ts_ms + 7) for r in rs]
        for data in (payload("d", rs, "b3"), payload("d", shifted, "b4")):
            ack = await svc.handle(incoming(data, "d"))
            assert (ack.status, ack.accepted, ack.duplicates) == ("duplicate", 0, 600)
        got = await store.query("d")
        assert sorted(r.seq for r in got) == list(range(1, 601))
        assert {(r.seq, r.ts_ms) for r in got} == {(r.seq, r.ts_ms) for r in rs}
        assert (await store.idempotency_state("d")).watermark == 600
    finally:
        await store.close()


def _expected(rs: list[Reading], bucket: int) -> list[tuple[str, int, float, float, float, int]]:
    groups: dict[tuple[str, int], list[float]] = {}
    for r in rs:
        groups.setdefault((r.sensor, r.ts_ms - r.ts_ms % bucket), []).append(r.value)
    return [(s, b, min(v), max(v), sum(v), len(v)) for (s, b), v in sorted(groups.items())]


def _rows(rows: list[Any]) -> list[tuple[str, int, float, float, float, int]]:
    out = []
    for a in rows:
        assert a.avg == pytest.approx(a.sum / a.count)
        out.append((a.sensor, a.bucket_ms, a.min, a.max, pytest.approx(a.sum), a.count))
    return out


async def test_continuous_aggregate_is_exact_with_late_readings(
        tsdb_dsn: str, schemas: list[tuple[str, str]]) -> None:
    store = await factory(tsdb_dsn, _schema(schemas, tsdb_dsn), timescale="on")()
    try:
        svc = IngestService(store)
        # 3 sensors, one reading per sensor every 60 s over 5 hours
        rs = make_readings("d", 900, step_ms=60_000)
        first, late = rs[:600], rs[600:]
        assert (await svc.handle(incoming(payload("d", first), "d"))).accepted == 600
        got = await store.aggregate("d", None, None, None, HOUR)
        assert _rows(got) == _expected(first, HOUR)
        # materialized now; a backlog arrives in those hours (and in later ones)
        late = [msgspec.structs.replace(r, ts_ms=r.ts_ms - 3 * HOUR) for r in late]
        assert (await svc.handle(incoming(payload("d", late, "late"), "d"))).accepted == 300
        got = await store.aggregate("d", None, None, None, HOUR)
        assert _rows(got) == _expected(first + late, HOUR)
        # a window and a sensor: whole buckets overlapping [start, end)
        start, end = T0 + HOUR + 5, T0 + 3 * HOUR - 5
        got = await store.aggregate("d", "s1", start, end, HOUR)
        want = [r for r in first + late
                if r.sensor == "s1" and T0 + HOUR <= r.ts_ms < T0 + 3 * HOUR]
        assert _rows(got) == _expected(want, HOUR) and len(got) == 2
        # another bucket width: plain SQL over the hypertable, same answer
        got = await store.aggregate("d", None, None, None, 15 * 60_000)
        assert _rows(got) == _expected(first + late, 15 * 60_000)
    finally:
        await store.close()


def test_ingest_benchmark_reports_timescale_beside_postgres(
        tsdb_dsn: str, postgres_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m bench ingest --stores postgres,timescale` (small): a hypertable, bytes
    per reading before and after compression, exactly once reading by reading."""
    import json

    from bench import ingest

    rc = ingest.main(["--readings", "4000", "--batch", "1000", "--devices", "2",
                      "--stores", "postgres,timescale", "--replicas", "1", "--no-race",
                      "--dsn", postgres_dsn, "--tsdb-dsn", tsdb_dsn])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)["results"]
    (pg,), (ts,) = res["postgres"]["runs"], res["timescale"]["runs"]
    assert pg["hypertable"] is False and ts["hypertable"] is True
    for run in (pg, ts):
        assert run["exactly_once"] and run["stored"] == 4000 and run["readings_per_s"] > 0
        assert run["bytes_per_reading"] > 0
    assert 0 < ts["compressed_bytes_per_reading"] < ts["bytes_per_reading"]


async def test_completeness_ledger_on_a_hypertable(tsdb_dsn: str,
                                                   schemas: list[tuple[str, str]]) -> None:
    await contract.check_completeness_ledger(
        factory(tsdb_dsn, _schema(schemas, tsdb_dsn), timescale="on"), "dev-l")
