"""InfluxDB store against a real influxd (1.x) started by the fixture on free loopback
ports: exactly once under resends, restarts and racing replicas; an outage (influxd
stopped) and recovery lose nothing; data InfluxDB cannot hold is dead-lettered."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench._influxd import InfluxServer
from cloud.ingest import IngestService
from cloud.stores.influx import InfluxStore
from pymigrate.types import Reading
from tests.conftest import require_binary
from tests.unit import cloud_contract as contract
from tests.unit.cloud_helpers import T0, incoming, make_readings, payload

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def influxd() -> Iterator[InfluxServer]:
    require_binary("influxd")
    srv = InfluxServer()
    srv.start()
    yield srv
    srv.cleanup()


def factory(srv: InfluxServer, tmp: Path, *, ledger: str = "ledger.db",
            **kw: object) -> contract.StoreFactory:
    db = f"t_{uuid.uuid4().hex[:8]}"

    async def make() -> InfluxStore:
        s = InfluxStore(srv.url, db=db, ledger_path=tmp / ledger, **kw)  # type: ignore[arg-type]
        await s.open()
        return s
    return make


async def test_resend_written_once_across_restart(influxd: InfluxServer, tmp_path: Path) -> None:
    await contract.check_resend_written_once(factory(influxd, tmp_path), "dev-a")


async def test_overlap_and_out_of_order(influxd: InfluxServer, tmp_path: Path) -> None:
    await contract.check_overlap_and_out_of_order(factory(influxd, tmp_path), "dev-b")


async def test_two_replicas_race_shared_ledger(influxd: InfluxServer, tmp_path: Path) -> None:
    await contract.check_replicas_race(factory(influxd, tmp_path), "race-")


async def test_replicas_with_own_ledgers_still_store_once(influxd: InfluxServer,
                                                          tmp_path: Path) -> None:
    """Replicas on different hosts: each has its own ledger, the overwrite keeps one copy."""
    db = f"t_{uuid.uuid4().hex[:8]}"
    stores = [InfluxStore(influxd.url, db=db, ledger_path=tmp_path / f"l{i}.db")
              for i in range(2)]
    for s in stores:
        await s.open()
    try:
        svcs = [IngestService(s) for s in stores]
        datas = [payload("d", make_readings("d", 300, seq0=1 + 300 * k), f"b{k}")
                 for k in range(5)]
        acks = await asyncio.gather(*(svc.handle(incoming(d)) for d in datas for svc in svcs))
        assert all(a.status in ("ok", "duplicate") for a in acks)
        assert await stores[0].count("d") == 1500
        got = await stores[1].query("d")
        assert sorted(r.seq for r in got) == list(range(1, 1501))
    finally:
        for s in stores:
            await s.close()


async def test_malformed_dead_lettered(influxd: InfluxServer, tmp_path: Path) -> None:
    make = factory(influxd, tmp_path)
    await contract.check_malformed_dead_lettered(make, "dev-m")
    store = await make()
    try:
        svc = IngestService(store)
        rs = make_readings("n", 3)
        rs[1] = Reading("n", rs[1].sensor, rs[1].ts_ms, float("nan"), seq=rs[1].seq)
        ack = await svc.handle(incoming(payload("n", rs, "nan")))
        assert (ack.status, ack.reason) == ("rejected", "non_finite_value")
        assert ("n", "nan", "non_finite_value") in await store.dead_letters()
        assert await store.count("n") == 0
    finally:
        await store.close()


async def test_field_type_conflict_is_rejected(influxd: InfluxServer, tmp_path: Path) -> None:
    """InfluxDB itself refuses the points (400): dead-lettered, not retried."""
    store = await factory(influxd, tmp_path, measurement="m")()
    try:
        await store._request("POST", "/write", {"db": store.db, "precision": "ms"},
                             f'm,device=x,sensor=s0 value="text" {T0}'.encode())
        ack = await IngestService(store).handle(incoming(payload("x", make_readings("x", 3))))
        assert (ack.status, ack.reason) == ("rejected", "influx_bad_request")
        assert store.retries == 0
    finally:
        await store.close()


async def test_outage_and_recovery_lose_nothing(tmp_path: Path) -> None:
    require_binary("influxd")
    srv = InfluxServer()  # a private server this test may stop
    srv.start()
    try:
        store = await factory(srv, tmp_path, max_retries=2, backoff_s=0.05, timeout_s=2.0)()
        svc = IngestService(store)
        pending = [payload("d", make_readings("d", 200, seq0=1 + 200 * k), f"b{k}")
                   for k in range(8)]
        acked: list[bytes] = []
        try:
            for k, data in enumerate(pending):
                if k == 3:
                    srv.stop()
                if k == 6:
                    srv.start()
                ack = await svc.handle(incoming(data))
                if ack.status == "ok":
                    acked.append(data)
                else:
                    assert (ack.status, ack.reason) == ("error", "store_unavailable")
            assert len(acked) == 5 and svc.counters["store_errors"] == 3
            assert store.retries == 6  # 2 retries for each failed batch
            for data in [d for d in pending if d not in acked] + acked[:1]:
                assert (await svc.handle(incoming(data))).status in ("ok", "duplicate")
            assert await store.count("d") == 1600
            assert (await store.idempotency_state("d")).watermark == 1600
        finally:
            await store.close()
    finally:
        srv.cleanup()


async def test_same_millisecond_readings_each_stored(influxd: InfluxServer,
                                                     tmp_path: Path) -> None:
    """Bursts: several readings of one sensor in one millisecond are each their own point
    (timestamp offset from the seq), accepted counts them, and a resend changes nothing;
    checked reading by reading against what was sent."""
    store = await factory(influxd, tmp_path)()
    try:
        svc = IngestService(store)
        rs = [Reading("d", f"s{i % 2}", T0 + (i // 6) * 1000, i * 0.5, seq=i + 1)
              for i in range(600)]  # each sensor: 3 readings per millisecond
        ack = await svc.handle(incoming(payload("d", rs)))
        assert (ack.status, ack.accepted) == ("ok", 600)
        again = await svc.handle(incoming(payload("d", rs)))
        assert (again.status, again.duplicates) == ("duplicate", 600)
        got = await store.query("d")
        assert sorted(got, key=lambda r: r.seq) == rs
        assert await store.count("d") == 600
    finally:
        await store.close()


async def test_completeness_ledger(influxd: InfluxServer, tmp_path: Path) -> None:
    """Beside the InfluxDB points, the ledger keeps streams, digests, gaps, conflicts and
    what landed; two agents sharing an id are told apart by the ``instance`` tag."""
    await contract.check_completeness_ledger(factory(influxd, tmp_path), "dev-l")
