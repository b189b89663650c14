"""IngestService over the SQLite store: acks only after commit, outage = back-pressure,
rejections dead-lettered, throttling, redundant gateways, same-instant conflicts."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from cloud.dedup import ConflictPolicy, GatewayDeduper
from cloud.ingest import IngestService
from cloud.ratelimit import DeviceRateLimiter
from cloud.stores.sqlite import SqliteStore
from pymigrate.clock import VirtualClock
from pymigrate.envelope import Batch, encode_batch
from pymigrate.types import Reading
from tests.unit.cloud_helpers import T0, FlakyStore, incoming, make_readings, payload


@pytest.fixture
async def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = SqliteStore(tmp_path / "cloud.db")
    await s.open()
    yield s
    await s.close()


async def test_outage_is_backpressure_then_nothing_lost(store: SqliteStore) -> None:
    flaky = FlakyStore(store)
    svc = IngestService(flaky)
    batches = [payload("d", make_readings("d", 100, seq0=1 + 100 * k), f"b{k}") for k in range(4)]
    assert (await svc.handle(incoming(batches[0]))).status == "ok"
    flaky.down = True
    for data in batches[1:]:  # the device keeps these and retries
        ack = await svc.handle(incoming(data))
        assert (ack.status, ack.reason, ack.accepted) == ("error", "store_unavailable", 0)
    assert await store.count("d") == 100 and svc.counters["store_errors"] == 3
    flaky.down = False
    for data in batches:  # retry everything, including the acked one
        await svc.handle(incoming(data))
    assert await store.count("d") == 400
    assert sorted(r.seq for r in await store.query("d")) == list(range(1, 401))
    assert svc.counters["readings_written"] == 400 and svc.counters["readings_duplicate"] == 100


async def test_unexpected_store_exception_is_an_outage(store: SqliteStore) -> None:
    flaky = FlakyStore(store, ConnectionResetError("peer reset"))
    flaky.down = True
    svc = IngestService(flaky)
    ack = await svc.handle(incoming(payload("d", make_readings("d", 3))))
    assert ack.status == "error"
    # a rejection while the store is down: still rejected, dead-letter failure counted
    ack = await svc.handle(incoming(b"garbage garbage garbage garbage"))
    assert ack.status == "rejected" and svc.counters["dead_letter_errors"] == 1


async def test_channel_identity_and_throttling(store: SqliteStore) -> None:
    clock = VirtualClock()
    svc = IngestService(store, clock=clock, limiter=DeviceRateLimiter(2.0, 2, clock=clock))
    data = payload("d", make_readings("d", 5))
    ack = await svc.handle(incoming(data, "someone-else"))
    assert (ack.status, ack.reason) == ("rejected", "device_mismatch")
    assert (await svc.handle(incoming(data, "d"))).status == "ok"
    assert (await svc.handle(incoming(data, "d"))).status == "duplicate"
    ack = await svc.handle(incoming(data, "d"))
    assert ack.status == "throttled" and ack.retry_after_s == pytest.approx(0.5)
    await clock.advance(0.5)
    assert (await svc.handle(incoming(data, "d"))).status == "duplicate"
    assert svc.counters["throttled"] == 1


async def test_empty_batch_acks_ok(store: SqliteStore) -> None:
    svc = IngestService(store)
    ack = await svc.handle(incoming(encode_batch(Batch("d", "empty", []))))
    assert ack.status == "ok" and ack.accepted == 0


def _copies(dev: str, values: list[float], *, seq0: int = 1, skew_ms: int = 0) -> list[Reading]:
    """One LoRa-style sensor ("node-7") heard by gateway ``dev``."""
    return [Reading(dev, "node-7", T0 + 60_000 * i + skew_ms, v, seq=seq0 + i, uncert_ms=20)
            for i, v in enumerate(values)]


async def test_gateway_first_keeps_first_copy(store: SqliteStore) -> None:
    svc = IngestService(store, gateway=GatewayDeduper(500, "first"))
    a = await svc.handle(incoming(payload("gw1", _copies("gw1", [1.0, 2.0, 3.0]))))
    b = await svc.handle(incoming(payload("gw2", _copies("gw2", [1.0, 2.0, 3.0, 4.0],
                                                         skew_ms=120))))
    assert a.accepted == 3 and b.status == "ok" and b.accepted == 1
    assert await store.count("gw1") == 3 and await store.count("gw2") == 1
    assert svc.counters["gateway_dropped"] == 3
    # gw2 resends: its dropped copies were acked too, so nothing moves
    again = await svc.handle(incoming(payload("gw2", _copies("gw2", [1.0, 2.0, 3.0, 4.0],
                                                             skew_ms=120))))
    assert again.status == "duplicate" and await store.count() == 4


async def test_gateway_last_replaces_stored_copy(store: SqliteStore) -> None:
    svc = IngestService(store, gateway=GatewayDeduper(500, "last", match_values=False))
    await svc.handle(incoming(payload("gw1", _copies("gw1", [1.0, 2.0]))))
    await svc.handle(incoming(payload("gw2", _copies("gw2", [1.5, 2.5], skew_ms=100))))
    assert await store.count("gw1") == 0
    assert [r.value for r in await store.query("gw2")] == [1.5, 2.5]
    assert svc.counters["gateway_replaced"] == 2


async def test_gateway_replacement_removes_one_stream_of_a_shared_id(
        store: SqliteStore) -> None:
    """Two agents share the id gw1 (a cloned image): both streams hold seq 1 and 2. A
    better copy from gw2 replaces the copies of one stream; the other stream's rows at
    the same sequence numbers stay, and the gap names only the replaced stream."""
    from agent.codec import seal_chunk

    def batch(dev: str, rs: list[Reading], inst: str, bid: str) -> bytes:
        return encode_batch(Batch(dev, bid, [seal_chunk(rs)], instance=inst, seq_base=1,
                                  hwm=max(r.seq for r in rs)))

    svc = IngestService(store, gateway=GatewayDeduper(500, "last", match_values=False))
    other = [Reading("gw1", "boiler", T0 + 60_000 * i, 50.0 + i, seq=1 + i) for i in range(2)]
    assert (await svc.handle(incoming(batch("gw1", _copies("gw1", [1.0, 2.0]), "a", "a1"))))\
        .status == "ok"
    assert (await svc.handle(incoming(batch("gw1", other, "b", "b1")))).status == "ok"
    ack = await svc.handle(incoming(batch("gw2", _copies("gw2", [1.5, 2.5], skew_ms=100),
                                          "c", "c1")))
    assert ack.status == "ok" and svc.counters["gateway_replaced"] == 2
    kept = await store.query("gw1")
    assert [(r.sensor, r.value) for r in kept] == [("boiler", 50.0), ("boiler", 51.0)]
    gaps = list(await store.db.execute_fetchall(
        "SELECT instance, count, reason FROM gaps WHERE device_id = 'gw1'"))
    assert [tuple(g) for g in gaps] == [("a", 2, "gateway_replaced")]


async def test_gateway_average_merges_into_stored(store: SqliteStore) -> None:
    svc = IngestService(store, gateway=GatewayDeduper(500, "average", match_values=False))
    await svc.handle(incoming(payload("gw1", _copies("gw1", [1.0, 2.0]))))
    ack = await svc.handle(incoming(payload("gw2", _copies("gw2", [3.0, 4.0], skew_ms=100))))
    assert ack.status == "ok" and ack.accepted == 2  # the merged rows
    rows = await store.query("gw1")
    assert [r.value for r in rows] == [2.0, 3.0] and await store.count("gw2") == 0
    assert [r.ts_ms - T0 for r in rows] == [50, 60_050]


@pytest.mark.parametrize(("policy", "values"), [
    ("first", [1.0]), ("last", [5.0]), ("average", [3.0]), ("best_quality", [5.0])])
async def test_same_instant_conflict_in_batch(store: SqliteStore, policy: str,
                                              values: list[float]) -> None:
    svc = IngestService(store, conflict_policy=ConflictPolicy(policy))
    a = Reading("d", "t", T0, 1.0, seq=1, quality=4)  # time uncertain
    b = Reading("d", "t", T0, 5.0, seq=2)
    other = Reading("d", "t", T0 + 1, 7.0, seq=3)
    ack = await svc.handle(incoming(payload("d", [a, b, other])))
    assert ack.status == "ok"
    got = await store.query("d")
    assert [r.value for r in got] == [*values, 7.0]
    assert svc.counters["conflicts_resolved"] == 1
    assert (await store.idempotency_state("d")).watermark == 3
    assert (await svc.handle(incoming(payload("d", [a, b, other])))).status == "duplicate"


async def test_aggregates_of_different_functions_are_not_conflicts(store: SqliteStore) -> None:
    from pymigrate.types import AggInfo

    svc = IngestService(store, conflict_policy="first")
    rs = [Reading("d", "t", T0, v, seq=i + 1, agg=AggInfo("w", fn, T0, 60))
          for i, (fn, v) in enumerate([("min", 1.0), ("max", 9.0), ("avg", 4.0)])]
    dup = msgspec.structs.replace(rs[0], seq=4)
    ack = await svc.handle(incoming(payload("d", [*rs, dup])))
    assert ack.accepted == 3 and await store.count("d") == 3


async def test_corrupt_chunk_in_valid_envelope(store: SqliteStore) -> None:
    from agent.codec import seal_chunk

    good = seal_chunk(make_readings("d", 10))
    bad = msgspec.structs.replace(good, checksum=good.checksum ^ 1)
    svc = IngestService(store)
    ack = await svc.handle(incoming(encode_batch(Batch("d", "cb", [good, bad]))))
    assert (ack.status, ack.reason) == ("rejected", "corrupt")
    assert await store.dead_letters() == [("d", "cb", "corrupt")]
    assert await store.count("d") == 0  # the good chunk is not written alone either


async def test_conflict_policy_without_conflicts_changes_nothing(store: SqliteStore) -> None:
    svc = IngestService(store, conflict_policy="average")
    ack = await svc.handle(incoming(payload("d", make_readings("d", 30))))
    assert ack.accepted == 30 and svc.counters["conflicts_resolved"] == 0
