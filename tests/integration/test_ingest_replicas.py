"""Two ingest replicas behind one broker (MQTT shared subscription, AMQP competing
consumers), each with its own PostgreSQL store instance on one database: devices that
resend every batch (and race their resends) end up with each reading stored once."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from bench.common import drop_pg_schema
from cloud.ingest import IngestService
from cloud.stores.postgres import PostgresStore
from tests.unit.cloud_helpers import make_readings, payload
from transports.config import AmqpConfig, MqttConfig

pytestmark = pytest.mark.integration

DEVICES, BATCHES, PER_BATCH = 3, 6, 100


@pytest.fixture
async def stores(postgres_dsn: str) -> AsyncIterator[list[PostgresStore]]:
    schema = f"pm_rep_{uuid.uuid4().hex[:10]}"
    out = [PostgresStore(postgres_dsn, schema=schema, pool_max=2) for _ in range(2)]
    for s in out:
        await s.open()
    yield out
    for s in out:
        await s.close()
    await drop_pg_schema(postgres_dsn, schema)


async def _devices_resend(make_uplink: Any, prefix: str) -> list[str]:
    """Each device sends every batch, then resends it twice at once over two links (a
    lost ack retried while a restarted agent resends too)."""
    devices = [f"{prefix}{uuid.uuid4().hex[:6]}" for _ in range(DEVICES)]

    async def run(dev: str) -> None:
        up, up2 = make_uplink(dev, 1), make_uplink(dev, 2)
        try:
            for b in range(BATCHES):
                data = payload(dev, make_readings(dev, PER_BATCH, seq0=1 + b * PER_BATCH),
                               f"{dev}-{b}")
                first = await up.send(data, batch_id=f"{dev}-{b}", timeout=10)
                assert first.status == "ok" and first.accepted == PER_BATCH
                again = await asyncio.gather(*(u.send(data, batch_id=f"{dev}-{b}", timeout=10)
                                               for u in (up, up2)))
                assert [a.status for a in again] == ["duplicate", "duplicate"]
        finally:
            await up.close()
            await up2.close()

    await asyncio.gather(*(run(d) for d in devices))
    return devices


async def _check(stores: list[PostgresStore], services: list[IngestService],
                 devices: list[str]) -> None:
    for dev in devices:
        assert await stores[0].count(dev) == BATCHES * PER_BATCH
        rows = await stores[1].query(dev)
        assert sorted(r.seq for r in rows) == list(range(1, BATCHES * PER_BATCH + 1))
    written = sum(s.counters["readings_written"] for s in services)
    assert written == DEVICES * BATCHES * PER_BATCH
    assert sum(s.counters["batches_duplicate"] for s in services) == 2 * DEVICES * BATCHES


async def test_mqtt_shared_subscription_two_replicas(mosquitto: tuple[str, int],
                                                     stores: list[PostgresStore]) -> None:
    from transports.mqtt import MqttIngestServer, MqttUplink

    u = uuid.uuid4().hex[:10]
    cfg = MqttConfig(host=mosquitto[0], port=mosquitto[1], prefix=f"pmtest/{u}",
                     share_group=f"g{u}", connect_timeout_s=3.0)
    services = [IngestService(s) for s in stores]
    servers = [MqttIngestServer(cfg) for _ in services]
    for srv, svc in zip(servers, services):
        await srv.start(svc.handle)
    try:
        devices = await _devices_resend(lambda d, i: MqttUplink(
            msgspec.structs.replace(cfg, client_id=f"{d}-{i}"), device_id=d), "mq")
    finally:
        for srv in servers:
            await srv.stop()
    assert all(srv.handled > 0 for srv in servers), [srv.handled for srv in servers]
    await _check(stores, services, devices)


async def test_amqp_competing_consumers_two_replicas(rabbitmq: str,
                                                     stores: list[PostgresStore]) -> None:
    from transports.amqp import AmqpIngestServer, AmqpUplink

    u = uuid.uuid4().hex[:10]
    cfg = msgspec.structs.replace(AmqpConfig(), exchange=f"pmtest.{u}",
                                  queue=f"pmtest.{u}.ingest", connect_timeout_s=3.0)
    services = [IngestService(s) for s in stores]
    servers = [AmqpIngestServer(cfg) for _ in services]
    for srv, svc in zip(servers, services):
        await srv.start(svc.handle)
    try:
        devices = await _devices_resend(lambda d, i: AmqpUplink(cfg, device_id=d), "aq")
    finally:
        await servers[0].delete_topology()
        for srv in servers:
            await srv.stop()
    await _check(stores, services, devices)
