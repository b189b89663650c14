"""PostgreSQL store against the real server: exactly once under resends, restarts and two
replicas racing; outages (a cut TCP path, killed backends) lose nothing; bad data is
dead-lettered with the server's reason; versioned migrations; TimescaleDB detection.

Each test run works in its own schema (search_path), dropped afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import asyncpg
import msgspec
import pytest

from bench.common import drop_pg_schema
from cloud.ingest import IngestService
from cloud.stores.base import StoreUnavailable
from cloud.stores.postgres import PostgresStore
from tests.unit import cloud_contract as contract
from tests.unit.cloud_helpers import incoming, make_readings, payload

pytestmark = pytest.mark.integration


@pytest.fixture
async def schema(postgres_dsn: str) -> AsyncIterator[str]:
    name = f"pm_test_{uuid.uuid4().hex[:10]}"
    yield name
    await drop_pg_schema(postgres_dsn, name)


def factory(dsn: str, schema: str, **kw: object) -> contract.StoreFactory:
    async def make() -> PostgresStore:
        s = PostgresStore(dsn, schema=schema, **kw)  # type: ignore[arg-type]
        await s.open()
        return s
    return make


@pytest.mark.parametrize("bulk", ["copy", "unnest"])
async def test_resend_written_once_across_restart(postgres_dsn: str, schema: str,
                                                  bulk: str) -> None:
    await contract.check_resend_written_once(factory(postgres_dsn, schema, bulk=bulk), "dev-a")


async def test_overlap_and_out_of_order(postgres_dsn: str, schema: str) -> None:
    await contract.check_overlap_and_out_of_order(factory(postgres_dsn, schema), "dev-b")


@pytest.mark.parametrize("bulk", ["copy", "unnest"])
async def test_two_replicas_race(postgres_dsn: str, schema: str, bulk: str) -> None:
    await contract.check_replicas_race(factory(postgres_dsn, schema, bulk=bulk), "race-",
                                       devices=4, batches=8, per_batch=250)


async def test_replicas_starting_together_on_a_new_schema(postgres_dsn: str,
                                                          schema: str) -> None:
    """Replicas started at once all open (CREATE SCHEMA IF NOT EXISTS alone races)."""
    for _ in range(3):  # the race is narrow: try a few fresh schemas
        name = f"{schema}_{uuid.uuid4().hex[:4]}"
        stores = [PostgresStore(postgres_dsn, schema=name, pool_max=1) for _ in range(4)]
        try:
            await asyncio.gather(*(s.open() for s in stores))
        finally:
            for s in stores:
                await s.close()
            await drop_pg_schema(postgres_dsn, name)


async def test_malformed_dead_lettered(postgres_dsn: str, schema: str) -> None:
    await contract.check_malformed_dead_lettered(factory(postgres_dsn, schema), "dev-m")


async def test_server_side_rejection_is_dead_lettered(postgres_dsn: str, schema: str) -> None:
    store = await factory(postgres_dsn, schema)()
    try:
        svc = IngestService(store)
        rs = make_readings("d", 5)
        bad = [*rs[:4], msgspec.structs.replace(rs[4], quality=2**40)]  # integer column
        ack = await svc.handle(incoming(payload("d", bad, "big")))
        assert (ack.status, ack.reason) == ("rejected", "pg_encode")  # int32 column
        assert await store.dead_letters() == [("d", "big", "pg_encode")]
        assert await store.count("d") == 0
        assert (await store.idempotency_state("d")).watermark == 0  # rolled back with it
        assert (await svc.handle(incoming(payload("d", rs)))).accepted == 5
    finally:
        await store.close()


async def test_migrations_versioned_and_plain_table_without_timescale(
        postgres_dsn: str, schema: str) -> None:
    s1 = await factory(postgres_dsn, schema)()
    s2 = await factory(postgres_dsn, schema)()  # second start: nothing to apply
    try:
        rows = await s1.pool.fetch("SELECT version FROM pymigrate_migrations")
        assert sorted(r[0] for r in rows) == [1, 2]
        usable = await s1.pool.fetchval(  # installed is not enough: it must be preloaded
            "SELECT count(*) FROM pg_settings WHERE name LIKE 'timescaledb.%'")
        assert s1.hypertable is bool(usable) and s2.hypertable is bool(usable)
        cols = {r[0] for r in await s1.pool.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = $1"
            " AND table_name = 'readings'", schema)}
        assert {"agg_rule", "agg_fn", "agg_window_end_ms", "agg_count", "raw_ts_ms"} <= cols
        key = await s1.pool.fetchval(
            "SELECT pg_get_constraintdef(c.oid) FROM pg_constraint c JOIN pg_namespace n"
            " ON n.oid = c.connamespace WHERE n.nspname = $1 AND c.contype = 'p'"
            " AND c.conrelid = 'readings'::regclass", schema)
        assert key.startswith("PRIMARY KEY (device_id, instance, seq")
    finally:
        await s1.close()
        await s2.close()


class CutProxy:
    """TCP proxy in front of PostgreSQL that can be cut (connections reset, new ones
    refused) and restored: a network outage between ingest and database."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.server: asyncio.Server | None = None
        self.port = 0
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in list(self.writers):
            w.transport.abort()
        await self.server.wait_closed()
        self.server = None

    async def _conn(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(*self.target)
        except OSError:
            w.transport.abort()
            return
        self.writers |= {w, uw}

        async def pipe(a: asyncio.StreamReader, b: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await a.read(65536):
                    b.write(data)
                    await b.drain()
            b.transport.abort()

        await asyncio.gather(pipe(r, uw), pipe(ur, w))
        self.writers -= {w, uw}


async def test_outage_and_recovery_lose_nothing(postgres_dsn: str, schema: str) -> None:
    proxy = CutProxy(("127.0.0.1", 5432))
    await proxy.start()
    dsn = postgres_dsn.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    assert dsn != postgres_dsn
    store = await factory(dsn, schema, connect_timeout_s=1.0, command_timeout_s=2.0)()
    svc = IngestService(store)
    pending = [payload("d", make_readings("d", 200, seq0=1 + 200 * k), f"b{k}")
               for k in range(10)]
    try:
        acked: list[bytes] = []
        for k, data in enumerate(pending):
            if k == 3:
                await proxy.cut()
            if k == 7:
                await proxy.start()  # same port
            ack = await svc.handle(incoming(data))
            if ack.status == "ok":
                acked.append(data)
            else:
                assert (ack.status, ack.reason) == ("error", "store_unavailable")
        assert len(acked) == 6 and svc.counters["store_errors"] == 4
        # the device retries whatever was not acked (and, being unsure, one acked batch)
        for data in [d for d in pending if d not in acked] + acked[:1]:
            assert (await svc.handle(incoming(data))).status in ("ok", "duplicate")
        assert await store.count("d") == 2000
        assert (await store.idempotency_state("d")).watermark == 2000
    finally:
        await store.close()
        if proxy.server is not None:
            await proxy.cut()


async def test_killed_backends_reconnect(postgres_dsn: str, schema: str) -> None:
    app = f"pm-kill-{uuid.uuid4().hex[:6]}"
    store = await factory(postgres_dsn, schema, application_name=app)()
    svc = IngestService(store)
    admin = await asyncpg.connect(postgres_dsn)
    try:
        assert (await svc.handle(incoming(payload("d", make_readings("d", 50))))).status == "ok"
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = $1", app)
        assert killed >= 1
        statuses = []
        for k in range(1, 4):  # at most the pool's dead connections fail, then recovery
            data = payload("d", make_readings("d", 50, seq0=1 + 50 * k), f"b{k}")
            ack = await svc.handle(incoming(data))
            if ack.status == "error":
                ack = await svc.handle(incoming(data))  # the device's retry
            statuses.append(ack.status)
        assert statuses == ["ok", "ok", "ok"]
        assert await store.count("d") == 200
    finally:
        await admin.close()
        await store.close()


async def test_unreachable_at_open(schema: str) -> None:
    from tests.conftest import free_port

    s = PostgresStore(f"postgresql://postgres@127.0.0.1:{free_port()}/test", schema=schema,
                      connect_timeout_s=1.0)
    with pytest.raises(StoreUnavailable):
        await s.open()


async def test_unique_key_is_second_line_of_defence(postgres_dsn: str, schema: str) -> None:
    """The idempotency state is lost (restored from an old backup): the (device_id, seq)
    key still keeps every reading once, and the state is rebuilt."""
    from cloud.dedup import IdempotencyState

    store = await factory(postgres_dsn, schema)()
    try:
        svc = IngestService(store)
        data = payload("d", make_readings("d", 400))
        assert (await svc.handle(incoming(data))).accepted == 400
        await store.pool.execute("UPDATE idempotency SET state = $1",
                                 IdempotencyState().to_bytes())
        mixed = payload("d", make_readings("d", 500), "mixed")  # 400 old + 100 new
        ack = await svc.handle(incoming(mixed))
        assert (ack.status, ack.accepted, ack.duplicates) == ("ok", 100, 400)
        assert store.copy_fallbacks == 1
        assert await store.count("d") == 500
        assert (await store.idempotency_state("d")).watermark == 500
        assert (await svc.handle(incoming(mixed))).status == "duplicate"
    finally:
        await store.close()


@pytest.mark.parametrize(("policy", "gw1", "gw2"), [
    ("last", [], [1.5, 2.5]), ("average", [1.25, 2.25], [])])
async def test_gateway_policies_replace_in_one_transaction(
        postgres_dsn: str, schema: str, policy: str, gw1: list[float],
        gw2: list[float]) -> None:
    from cloud.dedup import GatewayDeduper
    from pymigrate.types import Reading
    from tests.unit.cloud_helpers import T0

    store = await factory(postgres_dsn, schema)()
    try:
        svc = IngestService(store, gateway=GatewayDeduper(500, policy, match_values=False))
        for dev, vals, skew in (("gw1", [1.0, 2.0], 0), ("gw2", [1.5, 2.5], 80)):
            rs = [Reading(dev, "node-3", T0 + 60_000 * i + skew, v, seq=i + 1)
                  for i, v in enumerate(vals)]
            assert (await svc.handle(incoming(payload(dev, rs)))).status == "ok"
        assert [r.value for r in await store.query("gw1")] == gw1
        assert [r.value for r in await store.query("gw2")] == gw2
        assert svc.counters["gateway_replaced"] == 2
    finally:
        await store.close()


async def test_completeness_ledger(postgres_dsn: str, schema: str) -> None:
    await contract.check_completeness_ledger(factory(postgres_dsn, schema), "dev-l")


async def test_a_version_1_database_is_migrated_with_its_rows(postgres_dsn: str,
                                                              schema: str) -> None:
    from cloud.stores.postgres import MIGRATIONS, migrate

    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
        await conn.execute(f"SET search_path TO {schema}")
        await migrate(conn, MIGRATIONS[:1])  # a database written by the previous release
        await conn.execute(
            "INSERT INTO readings (device_id, seq, sensor, ts_ms, value, priority, quality,"
            " uncert_ms, received_ms) VALUES ('d', 1, 's', 5, 1.5, 2, 0, 0, 9)")
    finally:
        await conn.close()
    store = await factory(postgres_dsn, schema)()
    try:
        assert [r.value for r in await store.query("d")] == [1.5]
        svc = IngestService(store)
        from tests.unit.cloud_helpers import stream_payload

        ack = await svc.handle(incoming(stream_payload("d", make_readings("d", 3), "b")))
        assert ack.status == "ok" and await store.count("d") == 4  # a new stream beside it
        await store.dead_letter("d", "b", "x", b"p", peer="me")
    finally:
        await store.close()
