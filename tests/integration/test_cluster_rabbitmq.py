"""The AMQP path on a real 3-node RabbitMQ cluster (quorum queue): agents keep sending
while the node the ingest consumes from (and the queue's leader) is frozen, then killed;
the ingest reconnects to another node,
the agents move too, and the completeness ledger and the harness's own record agree
that every reading is stored exactly once."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from bench._amqp_fleet import AmqpFleet, audit_rows
from bench._rabbit_cluster import RabbitCluster, rabbitmq_missing
from cloud.ingest import IngestService
from cloud.stores.sqlite import SqliteStore
from tests.conftest import REQUIRE
from transports.amqp import AmqpIngestServer
from transports.config import AmqpConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _need_rabbitmq() -> None:
    why = rabbitmq_missing()
    if why is None:
        return
    if REQUIRE:
        pytest.fail(f"{why} (required in CI)")
    pytest.skip(why)


async def _until(pred: object, limit_s: float) -> bool:
    assert callable(pred)
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        if await pred():
            return True
        await asyncio.sleep(0.2)
    return bool(await pred())


async def test_node_kill_loses_nothing_and_stores_nothing_twice(tmp_path: Path) -> None:
    _need_rabbitmq()
    async with RabbitCluster(3, workdir=tmp_path / "rabbit") as cluster:
        assert len(await cluster.running_nodes()) == 3
        store = SqliteStore(tmp_path / "cloud.db")
        await store.open()
        service = IngestService(store)
        cfg = AmqpConfig(hosts=cluster.hosts, exchange="pmc", queue="pmc.ingest",
                         connect_timeout_s=3.0, reconnect_max_s=1.0)
        server = AmqpIngestServer(cfg)
        await server.start(service.handle)
        fleet = AmqpFleet(4, cluster.hosts, tmp_path / "agents", exchange="pmc", sensors=5,
                          rate_hz=5.0, chunk_max_age_s=0.5, drain_timeout_s=30.0)
        try:
            await fleet.start()
            assert await _until(lambda: _stored_any(store), 30), fleet.failed()
            # the node the ingest consumes from (it declared the queue: its leader too),
            # frozen first so that it dies holding publishes it has not confirmed and
            # deliveries the ingest has not acked
            victim = cluster.hosts.index(server.node)
            await cluster.kill(victim, stall_s=1.0)
            # the ingest finds another node and goes on; the agents keep producing
            assert await _until(lambda: _reconnected(server), 30)
            before = await store.count()
            assert await _until(lambda: _more_than(store, before + 100), 30)
            alive = next(i for i in range(3) if i != victim)
            queues = await cluster.ctl(cluster.nodes[alive], "list_queues", "-q", "name", "type")
            assert "pmc.ingest\tquorum" in queues, queues
            agents = await fleet.stop()
        finally:
            await server.stop()
        try:
            assert agents["agents_stopped_cleanly"] == 4, agents
            rows = [(r.device_id, r.sensor, r.value, r.ts_ms, r.seq)
                    for d in fleet.devices for r in await store.query(d.agent.device_id)]
            audit = audit_rows(fleet.produced, rows)
            assert audit["produced"] > 0
            assert audit["lost"] == 0 and audit["duplicated"] == 0, audit
            assert audit["foreign"] == 0 and audit["ts_mismatch"] == 0, audit
            streams = await store.completeness()
            assert {s.device_id for s in streams} == {d.agent.device_id for d in fleet.devices}
            assert sum(s.unexplained for s in streams) == 0
            assert sum(s.duplicates + s.conflicts for s in streams) == 0
            assert sum(s.stored for s in streams) == audit["produced"] == len(rows)
            assert sum(s.max_seq for s in streams) == audit["produced"]
        finally:
            await store.close()


async def _stored_any(store: SqliteStore) -> bool:
    return await store.count() > 0


async def _more_than(store: SqliteStore, n: int) -> bool:
    return await store.count() > n


async def _reconnected(server: AmqpIngestServer) -> bool:
    return server.reconnects >= 1
