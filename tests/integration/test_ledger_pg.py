"""The InfluxDB/Timestream idempotency ledger in PostgreSQL (``ledger_dsn``): the store
contract over a PgLedger on the real PostgreSQL (a fresh schema per test, dropped), with
the in-process InfluxDB double that records every point it is sent (no overwrite hides a
second write: ``count`` counts them all). Two replicas with their own ledger objects on
one schema stand for replicas on two hosts: every point is sent once."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bench.common import drop_pg_schema
from cloud.audit import main as completeness_main
from cloud.config import build_store, parse_cloud_config
from cloud.ingest import IngestService
from cloud.stores.base import StoreUnavailable
from cloud.stores.influx import InfluxStore
from cloud.stores.ledger_pg import PgLedger
from cloud.stores.timestream import TimestreamStore
from pymigrate.errors import ConfigError
from tests.conftest import free_port
from tests.unit import cloud_contract as contract
from tests.unit.cloud_helpers import InstantClock, incoming, make_readings, payload
from tests.unit.test_cloud_influx import FakeInflux, serve_fake

pytestmark = pytest.mark.integration


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeInflux, str]]:
    async with serve_fake() as served:
        yield served


@pytest.fixture
async def schema(postgres_dsn: str) -> AsyncIterator[str]:
    name = f"pm_led_{uuid.uuid4().hex[:10]}"
    yield name
    await drop_pg_schema(postgres_dsn, name)


def factory(url: str, dsn: str, schema: str, **kw: Any) -> contract.StoreFactory:
    async def make() -> InfluxStore:
        s = InfluxStore(url, ledger=PgLedger(dsn, schema=schema, pool_max=2),
                        clock=InstantClock(), **kw)
        await s.open()
        return s
    return make


async def test_resend_written_once_across_restart(fake: tuple[FakeInflux, str],
                                                  postgres_dsn: str, schema: str) -> None:
    f, url = fake
    await contract.check_resend_written_once(factory(url, postgres_dsn, schema), "dev-a")
    assert len(f.points) == 300


async def test_replicas_on_two_hosts_send_each_point_once(
        fake: tuple[FakeInflux, str], postgres_dsn: str, schema: str) -> None:
    f, url = fake
    await contract.check_replicas_race(factory(url, postgres_dsn, schema), "race-")
    assert len(f.points) == 3 * 6 * 200  # the other replica's copy was never sent


async def test_malformed_dead_lettered(fake: tuple[FakeInflux, str], postgres_dsn: str,
                                       schema: str) -> None:
    await contract.check_malformed_dead_lettered(factory(fake[1], postgres_dsn, schema),
                                                 "dev-m")


async def test_completeness_ledger(fake: tuple[FakeInflux, str], postgres_dsn: str,
                                   schema: str, tmp_path: Path) -> None:
    await contract.check_completeness_ledger(factory(fake[1], postgres_dsn, schema), "dev-l")
    # the CLI reads the same ledger from the ingest's config
    cfg = tmp_path / "cloud.toml"
    cfg.write_text(f'[cloud]\nstore = "influx"\n[cloud.influx]\nurl = "{fake[1]}"\n'
                   f'ledger_dsn = "{postgres_dsn}"\nledger_schema = "{schema}"\n')
    out: list[str] = []

    class Out:
        def write(self, s: str) -> None:
            out.append(s)

    rc = await asyncio.to_thread(completeness_main, ["dev-l", "--config", str(cfg), "--json"],
                                 out=Out())
    assert rc == 1  # the contract leaves unexplained seqs and conflicts on purpose
    [dev] = json.loads("".join(out))["devices"]
    assert (dev["device_id"], dev["instances"], dev["unexplained"]) == ("dev-l", 2, 10)


async def test_later_request_failing_keeps_the_ledger_on_what_landed(
        fake: tuple[FakeInflux, str], postgres_dsn: str, schema: str) -> None:
    f, url = fake
    s = await factory(url, postgres_dsn, schema, max_lines=4, max_retries=1)()
    try:
        f.fail_writes_after = 2  # requests 1-2 (8 points) land, request 3 fails
        with pytest.raises(StoreUnavailable):
            await s.write("d", "b", make_readings("d", 10))
        assert (await s.idempotency_state("d")).watermark == 8  # not rolled back
        f.fail_writes_after = None
        res = await s.write("d", "b", make_readings("d", 10))  # the device's retry
        assert (res.written, res.duplicates) == (2, 8) and len(f.points) == 10
        streams = await s.completeness("d")
        assert [(x.stored, x.unexplained) for x in streams] == [(10, 0)]
    finally:
        await s.close()


async def test_ingest_rejection_dead_letter(fake: tuple[FakeInflux, str],
                                            postgres_dsn: str, schema: str) -> None:
    s = await factory(fake[1], postgres_dsn, schema)()
    try:
        svc = IngestService(s)
        ack = await svc.handle(incoming(payload("x", make_readings("x", 3)), "y"))
        assert ack.status == "rejected" and ack.reason == "device_mismatch"
        assert (await s.dead_letters())[0][2] == "device_mismatch"
    finally:
        await s.close()


async def test_unreachable_ledger_is_an_outage(fake: tuple[FakeInflux, str]) -> None:
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/test"
    s = InfluxStore(fake[1], ledger=PgLedger(dead, schema="x", connect_timeout_s=1.0))
    with pytest.raises(StoreUnavailable):
        await s.open()
    with pytest.raises(ValueError):
        PgLedger(dead, schema="no-such;schema")


def test_config_puts_the_ledger_in_postgres(tmp_path: Path) -> None:
    dsn = "postgresql://postgres@127.0.0.1:5432/test"
    for store, cls in (("influx", InfluxStore), ("timestream", TimestreamStore)):
        cfg = parse_cloud_config({"store": store, store: {"ledger_dsn": dsn,
                                                          "ledger_schema": "led"}})
        built = build_store(cfg)
        assert isinstance(built, cls) and isinstance(built.ledger, PgLedger)
        assert built.ledger.schema == "led"
        with pytest.raises(ConfigError) as ei:
            parse_cloud_config({"store": store, store: {"ledger_dsn": "mysql://x"}})
        assert ei.value.key == f"cloud.{store}.ledger_dsn"
        with pytest.raises(ConfigError) as ei:
            parse_cloud_config({"store": store, store: {"ledger_schema": "a-b"}})
        assert ei.value.key == f"cloud.{store}.ledger_schema"
    plain = build_store(parse_cloud_config({"store": "influx"}))
    assert not isinstance(plain.ledger, PgLedger)  # type: ignore[attr-defined]
