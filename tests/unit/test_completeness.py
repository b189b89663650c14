"""The cloud side of the completeness ledger, through the real ingest and SQLite store:
two agents sharing a device id, conflicts never taken for duplicates, gap records, late
chunks, rejections dead-lettered with their peer, and the accounting itself."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from agent.codec import seal_chunk
from cloud.audit import main as completeness_main
from cloud.ingest import IngestService
from cloud.stores.completeness import account, runs_subtract, runs_union
from cloud.stores.sqlite import SqliteStore
from pymigrate.envelope import Batch, decode_batch, encode_batch
from pymigrate.types import Gap, Quality, Reading
from tests.unit.cloud_helpers import make_readings
from transports.base import Incoming


def env(device: str, rs: list[Reading], batch_id: str, *, instance: str = "a" * 16,
        gaps: list[Gap] | None = None, hwm: int = 0, chunk: int = 50) -> bytes:
    chunks = [seal_chunk(rs[i:i + chunk]) for i in range(0, len(rs), chunk)]
    top = max([hwm, *(r.seq for r in rs)], default=hwm)
    return encode_batch(Batch(device, batch_id, chunks, 1, instance, 1, top, gaps or []))


def inc(data: bytes, device: str | None = None) -> Incoming:
    return Incoming(data, "test", device, "test-peer 10.0.0.7")


@pytest.fixture
async def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = SqliteStore(tmp_path / "cloud.db")
    await s.open()
    yield s
    await s.close()


async def test_two_agents_sharing_a_device_id_are_two_streams_each_stored_once(
        store: SqliteStore) -> None:
    svc = IngestService(store)
    a = make_readings("gw", 300)
    b = [Reading("gw", r.sensor, r.ts_ms + 7, r.value + 1000, seq=r.seq) for r in a]
    for k in range(0, 300, 100):
        for inst, rs in (("a" * 16, a), ("b" * 16, b)):
            for _ in range(2):  # every batch resent once (a lost ack)
                ack = await svc.handle(inc(env("gw", rs[k:k + 100], f"{inst}{k}",
                                               instance=inst)))
                assert ack.status in ("ok", "duplicate")
                assert ack.count == 100
    assert await store.count("gw") == 600
    reports = await store.completeness("gw")
    assert [(r.instance, r.stored, r.max_seq, r.unexplained, r.conflicts) for r in reports] == [
        ("a" * 16, 300, 300, 0, 0), ("b" * 16, 300, 300, 0, 0)]


async def test_same_seqs_other_content_is_a_conflict_kept_apart(store: SqliteStore) -> None:
    svc = IngestService(store)
    rs = make_readings("d", 100)
    assert (await svc.handle(inc(env("d", rs, "b1")))).status == "ok"
    clone = [Reading("d", r.sensor, r.ts_ms, r.value + 1, seq=r.seq) for r in rs]
    ack = await svc.handle(inc(env("d", clone, "b2")))
    assert ack.status == "conflict" and ack.conflicts == 100 and ack.count == 100
    assert (await svc.handle(inc(env("d", rs, "b3")))).status == "duplicate"
    stored = await store.query("d")
    assert sorted(r.value for r in stored) == sorted(r.value for r in rs)  # first copy stays
    con = sqlite3.connect(store.path)
    rows = con.execute("SELECT count, payload FROM conflicts").fetchall()
    con.close()
    assert sum(r[0] for r in rows) == 100
    kept = decode_batch(rows[0][1])  # the second copy is kept whole
    assert {c.checksum for c in kept.chunks} == {c.checksum for c in
                                                 decode_batch(env("d", clone, "x")).chunks}
    (rep,) = await store.completeness("d")
    assert rep.conflicts == 100 and rep.unexplained == 0 and rep.stored == 100


async def test_gaps_account_for_what_the_device_gave_up(store: SqliteStore, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    svc = IngestService(store)
    rs = make_readings("d", 100)
    kept = [r for r in rs if r.seq % 3]
    lost = [r.seq for r in rs if not r.seq % 3]
    runs = [(s, s) for s in lost]
    gap = Gap(lost[0], lost[-1], len(lost), "evicted", 5, runs, "budget")
    ack = await svc.handle(inc(env("d", kept, "b1", gaps=[gap], hwm=103)))
    assert ack.status == "ok" and ack.gaps == 1
    (rep,) = await store.completeness("d")
    assert rep.stored == len(kept) and rep.gaps == {"evicted": len(lost)}
    assert rep.max_seq == 103 and rep.unexplained == 3  # 101..103 issued, not yet here
    assert rep.unexplained_runs == [(101, 103)]
    # the resend of a gap record is idempotent, and the state stays compact
    await svc.handle(inc(env("d", [], "b2", gaps=[gap], hwm=103)))
    st = await store.idempotency_state("d", "a" * 16)
    assert st.watermark == 100 and st.ranges() == []
    # a chunk the device recorded as evicted while it was in flight arrives late: stored
    late = [r for r in rs if r.seq in (3, 6)]
    assert (await svc.handle(inc(env("d", late, "b3")))).status == "ok"
    more = make_readings("d", 3, seq0=101)
    assert (await svc.handle(inc(env("d", more, "b4")))).status == "ok"
    (rep,) = await store.completeness("d")
    assert rep.unexplained == 0 and rep.stored == len(kept) + 5
    assert rep.gaps == {"evicted": len(lost) - 2}
    assert rep.stored + sum(rep.gaps.values()) == rep.max_seq
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[cloud]\nstore = "sqlite"\n[cloud.sqlite]\npath = "{store.path}"\n')
    assert await asyncio.to_thread(completeness_main, ["--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "evicted=31" in out and "d " in out


async def test_rejections_are_dead_lettered_with_peer_and_say_whether_kept(
        store: SqliteStore) -> None:
    svc = IngestService(store)
    good = env("dev-a", make_readings("dev-a", 10), "b1")
    ack = await svc.handle(inc(good, device="dev-b"))  # channel vouches for another device
    assert ack.status == "rejected" and ack.reason == "device_mismatch"
    assert not ack.dead_lettered  # identity: the device must keep its data
    ack = await svc.handle(inc(b"PMIG garbage", device="dev-a"))
    # kept for forensics, but nothing names its readings: the sender must keep them
    assert ack.status == "rejected" and not ack.dead_lettered
    con = sqlite3.connect(store.path)
    rows = con.execute("SELECT device_id, reason, peer, length(payload) FROM dead_letters "
                       "ORDER BY id").fetchall()
    con.close()
    assert rows == [("dev-a", "device_mismatch", "test-peer 10.0.0.7", len(good)),
                    ("dev-a", "truncated", "test-peer 10.0.0.7", 12)]
    for _ in range(5):  # the device keeps resending: the dead letters stay bounded
        await svc.handle(inc(good, device="dev-b"))
    assert svc.counters["dead_letters_rate_limited"] == 5


async def test_an_old_store_file_gets_the_instance_column(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    con = sqlite3.connect(path)
    con.executescript("""
        CREATE TABLE readings (device_id TEXT NOT NULL, seq INTEGER NOT NULL,
          sensor TEXT NOT NULL, ts_ms INTEGER NOT NULL, value REAL,
          priority INTEGER NOT NULL DEFAULT 2, quality INTEGER NOT NULL DEFAULT 0,
          uncert_ms INTEGER NOT NULL DEFAULT 0, raw_ts_ms INTEGER, agg_rule TEXT, agg_fn TEXT,
          agg_window_end_ms INTEGER, agg_count INTEGER, received_ms INTEGER NOT NULL,
          PRIMARY KEY (device_id, seq)) WITHOUT ROWID;
        CREATE TABLE dead_letters (id INTEGER PRIMARY KEY AUTOINCREMENT, device_id TEXT,
          batch_id TEXT, reason TEXT NOT NULL, payload BLOB, received_ms INTEGER NOT NULL);
        INSERT INTO readings (device_id, seq, sensor, ts_ms, value, received_ms)
          VALUES ('d', 1, 's', 5, 1.5, 9), ('d', 2, 's', 6, 2.5, 9);
    """)
    con.close()
    s = SqliteStore(path)
    await s.open()
    try:
        assert [r.value for r in await s.query("d")] == [1.5, 2.5]
        svc = IngestService(s)
        assert (await svc.handle(inc(env("d", make_readings("d", 2), "b")))).status == "ok"
        assert await s.count("d") == 4  # the new agent instance is its own stream
        await s.dead_letter("d", "b", "x", b"p", peer="me")
    finally:
        await s.close()


async def test_data_the_store_refuses_is_dead_lettered_and_named_in_the_ledger(
        store: SqliteStore) -> None:
    svc = IngestService(store)
    rs = make_readings("d", 20)
    bad = [*rs[:10], Reading("d", "x" * 300, rs[10].ts_ms, 1.0, seq=11), *rs[11:]]
    ack = await svc.handle(inc(env("d", bad, "b1", chunk=10)))
    assert ack.status == "rejected" and ack.reason == "bad_sensor" and ack.dead_lettered
    (rep,) = await store.completeness("d")
    assert rep.gaps == {"rejected": 20} and rep.unexplained == 0
    # the device isolates the chunks: the good one is stored after all, once
    assert (await svc.handle(inc(env("d", rs[:10], "b2", chunk=10)))).status == "ok"
    (rep,) = await store.completeness("d")
    assert rep.stored == 10 and rep.gaps == {"rejected": 10} and rep.unexplained == 0


def test_account_counts_reading_by_reading() -> None:
    assert runs_union([(1, 3)], [(4, 6), (10, 10)]) == [(1, 6), (10, 10)]
    assert runs_subtract([(1, 10)], [(2, 3), (5, 5), (9, 12)]) == [(1, 1), (4, 4), (6, 8)]
    exact = Gap(4, 6, 3, "evicted", 0, [(4, 6)])
    ranged = Gap(1, 20, 20, "corrupt", 0)  # explains only what nothing else does
    rep = account("d", "i", seq_base=1, hwm=25, stored=[(1, 3), (7, 9)], gaps=[ranged, exact])
    assert rep.stored == 6 and rep.gaps == {"evicted": 3, "corrupt": 11}
    assert rep.unexplained == 5 and rep.unexplained_runs == [(21, 25)]
    # a reading both stored and in a gap (delivered while evicted) counts once, as stored
    rep = account("d", "i", seq_base=1, hwm=6, stored=[(1, 6)], gaps=[exact])
    assert rep.stored == 6 and rep.gaps == {"evicted": 0} and rep.unexplained == 0


async def test_completeness_is_exported_as_metrics(store: SqliteStore) -> None:
    from prometheus_client import generate_latest

    from cloud.app import CloudApp
    from cloud.metrics import cloud_registry

    svc = IngestService(store)
    app = CloudApp(store, [], service=svc, completeness_interval_s=60)
    rs = make_readings("m", 10)
    gap = Gap(11, 12, 2, "expired", 0, [(11, 12)])
    await svc.handle(inc(env("m", rs, "b1", gaps=[gap], hwm=15)))
    await app.account()
    text = generate_latest(cloud_registry(svc, process=False, app=app)).decode()
    assert 'pymigrate_cloud_completeness_unexplained{device="m"} 3.0' in text
    assert 'pymigrate_cloud_completeness_gaps{device="m",reason="expired"} 2.0' in text
    assert 'pymigrate_cloud_completeness_stored{device="m"} 10.0' in text


async def test_implausible_readings_are_refused_with_their_reason(store: SqliteStore) -> None:
    import math
    import time

    svc = IngestService(store)
    now = time.time_ns() // 1_000_000
    ahead = now + 10 * 365 * 86_400_000
    # stamped without a clock model: retriable, the device keeps it (no gap, no letting go)
    unsynced = [Reading("p", "s", ahead, 1.0, seq=1)]
    ack = await svc.handle(inc(env("p", unsynced, "b0")))
    assert ack.status == "rejected" and ack.reason == "clock_unsynced"
    assert not ack.dead_lettered and ack.t_recv_ms >= now
    assert all(r.gaps == {} and r.stored == 0 for r in await store.completeness("p"))
    # corrected by the device's clock model and still ahead: bad data, dead-lettered
    future = [Reading("p", "s", ahead, 1.0, seq=1, quality=Quality.TIME_CORRECTED)]
    ack = await svc.handle(inc(env("p", future, "b1")))
    assert ack.status == "rejected" and ack.reason == "timestamp_future" and ack.dead_lettered
    nan = [Reading("p", "s", now, math.nan, seq=2)]
    ack = await svc.handle(inc(env("p", nan, "b2")))
    assert ack.reason == "non_finite_value"
    svc.allow_non_finite = True  # cloud.allow_non_finite: NaN kept (NULL in SQLite)
    assert (await svc.handle(inc(env("p", nan, "b3")))).status == "ok"
    (got,) = await store.query("p")
    assert math.isnan(got.value)


def test_an_unset_device_id_is_derived_not_a_shared_constant(tmp_path: Path) -> None:
    from agent.config import parse_agent_config, resolve_device_id

    cfg = parse_agent_config({"device": {"data_dir": str(tmp_path / "a")}})
    assert cfg.device.id == ""
    mid = tmp_path / "machine-id"
    mid.write_text("0123456789abcdef0123456789abcdef\n")
    a = resolve_device_id(cfg, machine_id_file=str(mid))
    mid.write_text("fedcba9876543210fedcba9876543210\n")
    b = resolve_device_id(cfg, machine_id_file=str(mid))
    assert a.device.id.startswith("gw-") and a.device.id != b.device.id
    # no machine id: generated once, kept in the data directory
    c1 = resolve_device_id(cfg, machine_id_file=str(tmp_path / "none"))
    c2 = resolve_device_id(cfg, machine_id_file=str(tmp_path / "none"))
    assert c1.device.id == c2.device.id == (tmp_path / "a" / "device-id").read_text().strip()
    other = parse_agent_config({"device": {"data_dir": str(tmp_path / "b")}})
    assert resolve_device_id(other, machine_id_file=str(tmp_path / "none")).device.id != \
        c1.device.id
    named = parse_agent_config({"device": {"id": "dock-7"}})
    assert resolve_device_id(named) is named
