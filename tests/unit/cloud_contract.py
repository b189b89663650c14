"""Store contract, run over every store: SQLite in the unit tests, PostgreSQL and InfluxDB
in the integration tests. Each check drives real wire payloads through IngestService."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from cloud.ingest import IngestService
from tests.unit.cloud_helpers import incoming, make_readings, payload

StoreFactory = Callable[[], Awaitable[Any]]  # returns an opened store


async def check_resend_written_once(make: StoreFactory, dev: str) -> None:
    store = await make()
    try:
        svc = IngestService(store)
        data = payload(dev, make_readings(dev, 300), "b1")
        first = await svc.handle(incoming(data, dev))
        assert (first.status, first.accepted, first.duplicates) == ("ok", 300, 0)
        for _ in range(3):
            again = await svc.handle(incoming(data, dev))
            assert (again.status, again.accepted, again.duplicates) == ("duplicate", 0, 300)
        assert await store.count(dev) == 300
        assert (await store.idempotency_state(dev)).watermark == 300
    finally:
        await store.close()
    # a restarted ingest (new store instance on the same database) still knows
    store = await make()
    try:
        svc = IngestService(store)
        again = await svc.handle(incoming(data, dev))
        assert again.status == "duplicate" and again.accepted == 0
        assert await store.count(dev) == 300
    finally:
        await store.close()


async def check_overlap_and_out_of_order(make: StoreFactory, dev: str) -> None:
    store = await make()
    try:
        svc = IngestService(store)
        a = await svc.handle(incoming(payload(dev, make_readings(dev, 100, seq0=101), "hi")))
        assert a.accepted == 100
        state = await store.idempotency_state(dev)
        assert state.watermark == 0 and state.ranges() == [(101, 200)]
        b = await svc.handle(incoming(payload(dev, make_readings(dev, 100, seq0=1), "lo")))
        assert b.accepted == 100
        # overlapping resend: 51..150, half of a, half of b -> all duplicates
        c = await svc.handle(incoming(payload(dev, make_readings(dev, 100, seq0=51), "mid")))
        assert (c.status, c.accepted, c.duplicates) == ("duplicate", 0, 100)
        # partly new: 181..230
        d = await svc.handle(incoming(payload(dev, make_readings(dev, 50, seq0=181), "new")))
        assert (d.status, d.accepted, d.duplicates) == ("ok", 30, 20)
        assert await store.count(dev) == 230
        assert (await store.idempotency_state(dev)).watermark == 230
        got = await store.query(dev)
        assert sorted(r.seq for r in got) == list(range(1, 231))
        want = {r.seq: r for r in make_readings(dev, 230)}
        assert all(msgspec.structs.astuple(r) == msgspec.structs.astuple(want[r.seq])
                   for r in got)
    finally:
        await store.close()


async def check_replicas_race(make: StoreFactory, dev_prefix: str, *, devices: int = 3,
                              batches: int = 6, per_batch: int = 200) -> None:
    """Two ingest replicas (two store instances) get every batch at the same time."""
    s1, s2 = await make(), await make()
    try:
        r1, r2 = IngestService(s1), IngestService(s2)
        datas = []
        for d in range(devices):
            dev = f"{dev_prefix}{d}"
            for b in range(batches):
                rs = make_readings(dev, per_batch, seq0=1 + b * per_batch)
                datas.append((dev, payload(dev, rs, f"{dev}-{b}")))
        acks = await asyncio.gather(*(svc.handle(incoming(data, dev))
                                      for dev, data in datas for svc in (r1, r2)))
        assert all(a.status in ("ok", "duplicate") for a in acks), acks
        total = devices * batches * per_batch
        assert sum(a.accepted for a in acks) == total
        assert sum(a.duplicates for a in acks) == total
        for d in range(devices):
            dev = f"{dev_prefix}{d}"
            assert await s1.count(dev) == batches * per_batch
            assert (await s2.idempotency_state(dev)).watermark == batches * per_batch
    finally:
        await s1.close()
        await s2.close()


async def check_malformed_dead_lettered(make: StoreFactory, dev: str) -> None:
    store = await make()
    try:
        svc = IngestService(store)
        good = payload(dev, make_readings(dev, 10), "good")
        cases = {
            "garbage": b"not an envelope at all, definitely",
            "bad_crc": good[:-1] + bytes([good[-1] ^ 0xFF]),
            "seq0": payload(dev, [msgspec.structs.replace(r, seq=0)
                                  for r in make_readings(dev, 5)], "seq0"),
            "nul": payload(dev, [msgspec.structs.replace(r, sensor="a\x00b")
                                 for r in make_readings(dev, 5)], "nul"),
        }
        reasons = {}
        for name, data in cases.items():
            ack = await svc.handle(incoming(data))
            assert ack.status == "rejected", (name, ack)
            reasons[name] = ack.reason
        assert reasons["seq0"] == "bad_seq" and reasons["nul"] == "bad_sensor"
        letters = await store.dead_letters()
        assert sorted(r for _, _, r in letters) == sorted(reasons.values())
        assert (dev, "seq0", "bad_seq") in letters  # device and batch travel with it
        assert await store.count(dev) == 0  # never a partial write
        assert svc.counters["dead_letters"] == 4
        ok = await svc.handle(incoming(good))
        assert ok.status == "ok" and await store.count(dev) == 10
    finally:
        await store.close()


async def check_completeness_ledger(make: StoreFactory, dev: str) -> None:
    """Streams, conflicts, gap records and late chunks, and the completeness report."""
    from pymigrate.types import Gap, Reading
    from tests.unit.cloud_helpers import stream_payload

    store = await make()
    try:
        svc = IngestService(store)
        a = make_readings(dev, 120)
        b = [Reading(dev, r.sensor, r.ts_ms + 3, r.value + 500, seq=r.seq) for r in a]
        for inst, rs in (("a" * 16, a), ("b" * 16, b)):  # two agents, one device id
            for _ in range(2):
                ack = await svc.handle(incoming(stream_payload(dev, rs, inst, instance=inst)))
                assert ack.status in ("ok", "duplicate") and ack.count == 120
        assert await store.count(dev) == 240
        clone = [Reading(dev, r.sensor, r.ts_ms, r.value + 1, seq=r.seq) for r in a[:50]]
        ack = await svc.handle(incoming(stream_payload(dev, clone, "c1")))
        assert ack.status == "conflict" and ack.conflicts == 50
        more = make_readings(dev, 30, seq0=121)
        kept = [r for r in more if r.seq % 2]
        runs = [(r.seq, r.seq) for r in more if not r.seq % 2]
        gap = Gap(runs[0][0], runs[-1][1], len(runs), "evicted", 0, runs, "budget")
        ack = await svc.handle(incoming(stream_payload(dev, kept, "g1", gaps=[gap], hwm=160)))
        assert ack.status == "ok" and ack.gaps == 1
        late = [r for r in more if r.seq == 122]  # was in flight when it was evicted
        assert (await svc.handle(incoming(stream_payload(dev, late, "l1")))).status == "ok"
        reports = {r.instance: r for r in await store.completeness(dev)}
        ra, rb = reports["a" * 16], reports["b" * 16]
        assert (ra.max_seq, ra.stored, ra.gaps, ra.unexplained, ra.conflicts) == (
            160, 120 + len(kept) + 1, {"evicted": len(runs) - 1}, 10, 50)
        assert ra.unexplained_runs == [(151, 160)]
        assert (rb.stored, rb.unexplained, rb.conflicts, rb.duplicates) == (120, 0, 0, 0)
    finally:
        await store.close()
