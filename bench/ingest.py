"""Cloud ingest benchmark: ``python -m bench ingest [--readings N] [--batch B]
[--devices D] [--inflight K] [--stores sqlite,postgres,timescale,influx] [--replicas 1,2]
[--dsn DSN] [--tsdb-dsn DSN] [--no-race] [--quick]``.

End to end on the cloud side: each measured item is a wire payload (envelope v3, chunks
of 500 readings sealed with the default codec, encoded beforehand as the devices would)
handed to :meth:`cloud.ingest.IngestService.handle`, which decodes and verifies it,
writes it idempotently and returns the ack after the commit. ``readings_per_s`` is
readings committed / wall time from the start barrier to the last ack of the slowest
replica. Replicas are separate processes (one asyncio loop, one IngestService and one
store instance each, as separate ingest containers would be), devices split between them
as a broker's shared subscription / competing consumers would; each keeps ``inflight``
batches in progress. ``cpu_us_per_reading`` is the replicas' process CPU time (all
threads: aiosqlite's worker included; the database server's CPU is not) / readings.
A third run (``race``) hands *every* batch to both of 2 replicas at once, as a broker
redelivering everything would: the readings are written once in total (the other
replica's copy is acked ``duplicate``); ``readings_per_s`` and ``cpu_us_per_reading`` are
per distinct reading.
After each run the store is checked reading by reading (``exactly_once``): every device's
stored readings, read back through the store's query, are exactly the produced ones
(device, seq, sensor, timestamp, value), none missing, none extra, none twice. The data
has same-millisecond readings: every 10th second repeats the previous second's
timestamps, so 20% of the readings share their series and millisecond with another one
(``same_millisecond_share``; a burst, or an RTC that stalled); a store that collapsed
them would fail the check.

Stores: SQLite (a temp file; replicas share it), PostgreSQL (``--dsn``, a throwaway
schema dropped afterwards; pool of 4 per replica, COPY into ``readings``,
``timescale = "off"``), TimescaleDB (``--tsdb-dsn``: the cluster ``make timescaledb``
starts; the same store with ``timescale = "on"``: a hypertable with compression and the
hourly continuous aggregate; no compression policy during the run, since the data is
months old and the policy would compress the chunks while they are written), InfluxDB 1.x
(a private ``influxd`` started on free loopback ports). On the PostgreSQL stores each run
also reports ``bytes_per_reading`` (the table with its indexes and TOAST, per reading); on
TimescaleDB the chunks are then compressed (what the compression policy does once chunks
age) and ``compressed_bytes_per_reading`` is measured the same way. A store that cannot be reached
is reported as skipped with the reason.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import random
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from agent.codec import seal_chunk
from bench.common import emit
from pymigrate.envelope import Batch, decode_batch, encode_batch
from pymigrate.types import Reading

T0 = 1_767_225_600_000
SENSORS = 10
CHUNK = 500
DEFAULT_DSN = os.environ.get("PYMIGRATE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
DEFAULT_TSDB = os.environ.get("PYMIGRATE_TEST_TSDB", "postgresql://postgres@127.0.0.1:5433/test")

Key = tuple[str, int, str, int, float]  # device, seq, sensor, ts_ms, value


def make_readings(devices: int, total: int, seed: int = 7) -> dict[str, list[Reading]]:
    """Per device, its readings in sequence order: 1 Hz, ``SENSORS`` random walks, and
    every 10th second stamped like the one before (same-millisecond readings)."""
    rnd = random.Random(seed)
    per_dev = total // devices
    out: dict[str, list[Reading]] = {}
    for d in range(devices):
        dev = f"bench-{d:03d}"
        walk = [20.0 + s for s in range(SENSORS)]
        rs: list[Reading] = []
        for i in range(per_dev):
            s, sec = i % SENSORS, i // SENSORS
            walk[s] += rnd.gauss(0, 0.05)
            if sec % 10 == 9:
                sec -= 1  # a burst: this second's readings share the previous one's ms
            rs.append(Reading(dev, f"sensor_{s}", T0 + sec * 1000, round(walk[s], 2),
                              seq=i + 1))
        out[dev] = rs
    return out


def make_payloads(readings: dict[str, list[Reading]], batch: int) -> dict[str, list[bytes]]:
    """Per device, its wire batches in sequence order (chunks of ``CHUNK``)."""
    out: dict[str, list[bytes]] = {}
    for dev, rs in readings.items():
        n = len(rs)
        out[dev] = [
            encode_batch(Batch(dev, f"{dev}-{k}", [
                seal_chunk(rs[j:j + CHUNK]) for j in range(k, min(k + batch, n), CHUNK)]))
            for k in range(0, n, batch)]
    return out


def same_ms_share(produced: dict[str, list[Reading]]) -> float:
    """Share of readings whose series and millisecond another reading has too."""
    from collections import Counter

    n = Counter((r.device_id, r.sensor, r.ts_ms) for rs in produced.values() for r in rs)
    total = sum(n.values())
    return round(sum(c for c in n.values() if c > 1) / total, 4) if total else 0.0


def _key(r: Reading) -> Key:
    return (r.device_id, r.seq, r.sensor, r.ts_ms, r.value)


async def check_exactly_once(spec: dict[str, Any],
                             produced: dict[str, list[Reading]]) -> dict[str, Any]:
    """Read every device's series back and compare it, reading by reading, with what was
    produced: ``exactly_once`` when nothing is missing, extra or stored twice."""
    store = _make_store(spec)
    await store.open()
    missing = extra = twice = stored = 0
    try:
        for dev, rs in produced.items():
            got = [_key(r) for r in await store.query(dev)]
            stored += len(got)
            have = set(got)
            twice += len(got) - len(have)
            want = {_key(r) for r in rs}
            missing += len(want - have)
            extra += len(have - want)
    finally:
        await store.close()
    return {"exactly_once": missing == extra == twice == 0, "stored": stored,
            "missing": missing, "extra": extra, "stored_twice": twice}


def _make_store(spec: dict[str, Any]) -> Any:
    kind = spec["kind"]
    if kind == "sqlite":
        from cloud.stores.sqlite import SqliteStore

        return SqliteStore(spec["path"])
    if kind in ("postgres", "timescale"):
        from cloud.stores.postgres import PostgresStore
        from cloud.stores.timescale import TimescaleOptions

        # no compression policy during the run: the data is months old and the policy
        # would compress chunks while they are written; compressed after the run instead
        return PostgresStore(spec["dsn"], schema=spec["schema"], pool_max=spec["pool"],
                             timescale="on" if kind == "timescale" else "off",
                             timescale_options=TimescaleOptions(compress_after_ms=0))
    from cloud.stores.influx import InfluxStore

    return InfluxStore(spec["url"], db=spec["db"], ledger_path=spec["ledger"])


async def _replica_main(spec: dict[str, Any], batches: list[bytes], inflight: int,
                        start: Any) -> dict[str, Any]:
    from cloud.ingest import IngestService
    from transports.base import Incoming

    store = _make_store(spec)
    await store.open()
    svc = IngestService(store)
    queue = list(reversed(batches))
    statuses: dict[str, int] = {}

    async def worker() -> None:
        while queue:
            ack = await svc.handle(Incoming(queue.pop(), "bench"))
            statuses[ack.status] = statuses.get(ack.status, 0) + 1

    await asyncio.to_thread(start.wait)  # barrier: every replica open and ready
    c0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    await store.close()
    return {"wall_s": wall, "cpu_s": cpu, "t_end": time.time(),
            "written": svc.counters["readings_written"], "statuses": statuses}


def _replica(spec: dict[str, Any], batches: list[bytes], inflight: int, start: Any,
             out: Any) -> None:
    try:
        out.put(asyncio.run(_replica_main(spec, batches, inflight, start)))
    except BaseException as exc:  # report, do not hang the parent
        out.put({"error": f"{type(exc).__name__}: {exc}"})


def run_replicas(spec: dict[str, Any], payloads: dict[str, list[bytes]], replicas: int,
                 inflight: int, *, race: bool = False) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    devs = sorted(payloads)
    if race:  # every replica gets every batch (redelivery storm): written once in total
        shares = [[b for d in devs for b in payloads[d]] for _ in range(replicas)]
    else:
        shares = [[b for d in devs[r::replicas] for b in payloads[d]] for r in range(replicas)]
    start = ctx.Barrier(replicas + 1)
    out = ctx.Queue()
    procs = [ctx.Process(target=_replica, args=(spec, shares[r], inflight, start, out))
             for r in range(replicas)]
    for p in procs:
        p.start()
    start.wait(timeout=60)
    t_start = time.time()
    results = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        return {"error": errors[0]}
    readings = sum(r["written"] for r in results)
    wall = max(r["t_end"] for r in results) - t_start
    statuses: dict[str, int] = {}
    for r in results:
        for k, v in r["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    return {"replicas": replicas, "race": race, "readings": readings, "wall_s": round(wall, 3),
            "readings_per_s": round(readings / wall),
            "cpu_us_per_reading": round(sum(r["cpu_s"] for r in results) / readings * 1e6, 2),
            "acks": statuses}


async def _count(spec: dict[str, Any]) -> int:
    store = _make_store(spec)
    await store.open()
    try:
        return int(await store.count())
    finally:
        await store.close()


def decode_cost_us(payloads: dict[str, list[bytes]]) -> float:
    """CPU of decode + verify + open chunks alone, per reading (the store-free floor)."""
    from agent.codec import open_chunk

    batches = [b for bs in payloads.values() for b in bs][:20]
    n = 0
    c0 = time.process_time()
    for data in batches:
        for ch in decode_batch(data).chunks:
            n += len(open_chunk(ch))
    return round((time.process_time() - c0) / n * 1e6, 3)


async def pg_storage(spec: dict[str, Any], readings: int) -> dict[str, Any]:
    """Bytes per reading of ``readings`` on disk (table + indexes + TOAST); on TimescaleDB
    also after compressing every chunk."""
    from cloud.stores import timescale as tsdb

    store = _make_store(spec)
    await store.open()
    try:
        async with store.pool.acquire() as conn:
            ts = store.timescale_schema
            if ts is None:
                size = await conn.fetchval("SELECT pg_total_relation_size('readings')")
                return {"hypertable": False, "bytes_per_reading": round(size / readings, 2)}
            before = await tsdb.storage_bytes(conn, ts, store.schema)
            t0 = time.perf_counter()
            chunks = await tsdb.compress_all(conn, ts, store.schema)
            took = time.perf_counter() - t0
            after = await tsdb.storage_bytes(conn, ts, store.schema)
    finally:
        await store.close()
    return {"hypertable": True,
            "bytes_per_reading": round(before["total_bytes"] / readings, 2),
            "compressed_bytes_per_reading": round(after["total_bytes"] / readings, 2),
            "compressed_chunks": chunks, "compress_s": round(took, 2)}


def bench_store(kind: str, args: argparse.Namespace, payloads: dict[str, list[bytes]],
                produced: dict[str, list[Reading]], replica_counts: list[int],
                tmp: Path) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    server = None
    try:
        if kind == "influx":
            from bench._influxd import InfluxServer

            server = InfluxServer()
            server.start()
        modes = [(n, False) for n in replica_counts] + ([(2, True)] if args.race else [])
        for n, race in modes:
            tag = uuid.uuid4().hex[:8]
            if kind == "sqlite":
                spec: dict[str, Any] = {"kind": kind, "path": str(tmp / f"cloud-{tag}.db")}
            elif kind in ("postgres", "timescale"):
                dsn = args.dsn if kind == "postgres" else args.tsdb_dsn
                spec = {"kind": kind, "dsn": dsn, "schema": f"pm_bench_{tag}", "pool": 4}
            else:
                assert server is not None
                spec = {"kind": kind, "url": server.url, "db": f"bench_{tag}",
                        "ledger": str(tmp / f"ledger-{tag}.db")}
            asyncio.run(_count(spec))  # create schema / database before the clock starts
            try:
                run = run_replicas(spec, payloads, n, args.inflight, race=race)
                if "error" not in run:
                    t_check = time.perf_counter()
                    check = asyncio.run(check_exactly_once(spec, produced))
                    run |= check | {"check_s": round(time.perf_counter() - t_check, 2)}
                    run["exactly_once"] = check["exactly_once"] and run["readings"] == sum(
                        len(rs) for rs in produced.values())
                    if kind in ("postgres", "timescale"):
                        run |= asyncio.run(pg_storage(spec, check["stored"]))
                runs.append(run)
            finally:
                if kind in ("postgres", "timescale"):
                    asyncio.run(_drop_schema(spec["dsn"], spec["schema"]))
    except (OSError, FileNotFoundError, TimeoutError, RuntimeError) as exc:
        return {"skipped": f"{type(exc).__name__}: {exc}"}
    except Exception as exc:  # store unavailable and the like
        return {"skipped": f"{type(exc).__name__}: {exc}"}
    finally:
        if server is not None:
            server.cleanup()
    return {"runs": runs}


async def _drop_schema(dsn: str, schema: str) -> None:
    import asyncpg

    from cloud.stores.timescale import drop_schema

    conn = await asyncpg.connect(dsn)
    try:
        await drop_schema(conn, schema)  # TimescaleDB's background jobs may be running
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench ingest")
    p.add_argument("--readings", type=int, default=400_000)
    p.add_argument("--batch", type=int, default=5_000, help="readings per batch")
    p.add_argument("--devices", type=int, default=16)
    p.add_argument("--inflight", type=int, default=4, help="batches in progress per replica")
    p.add_argument("--stores", default="sqlite,postgres,timescale,influx")
    p.add_argument("--replicas", default="1,2")
    p.add_argument("--dsn", default=DEFAULT_DSN, help="PostgreSQL (plain tables)")
    p.add_argument("--tsdb-dsn", default=DEFAULT_TSDB,
                   help="PostgreSQL with TimescaleDB preloaded (`make timescaledb`)")
    p.add_argument("--no-race", dest="race", action="store_false",
                   help="skip the run where 2 replicas both get every batch")
    p.add_argument("--quick", action="store_true", help="40,000 readings (smoke run)")
    args = p.parse_args(argv)
    if args.quick:
        args.readings = 40_000
    args.readings -= args.readings % args.devices
    replica_counts = [int(x) for x in args.replicas.split(",")]
    t_gen = time.perf_counter()
    produced = make_readings(args.devices, args.readings)
    payloads = make_payloads(produced, args.batch)
    gen_s = time.perf_counter() - t_gen
    wire = sum(len(b) for bs in payloads.values() for b in bs)
    results: dict[str, Any] = {
        "wire_bytes_per_reading": round(wire / args.readings, 2),
        "decode_only_cpu_us_per_reading": decode_cost_us(payloads),
        "payload_generation_s": round(gen_s, 2),
    }
    with tempfile.TemporaryDirectory(prefix="pm-bench-ingest-") as tmp:
        for kind in args.stores.split(","):
            results[kind] = bench_store(kind.strip(), args, payloads, produced, replica_counts,
                                        Path(tmp))
    emit("ingest", {"readings": args.readings, "batch": args.batch, "chunk": CHUNK,
                    "devices": args.devices, "inflight": args.inflight,
                    "replicas": replica_counts, "sensors_per_device": SENSORS,
                    "same_millisecond_share": same_ms_share(produced)}, results)
    return 0
