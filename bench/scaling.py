"""CPU per reading of the cloud side, stage by stage, and what it means at fleet scale:
``python -m bench scaling [--batches 200] [--nodes 3] [--dsn DSN] [--tsdb-dsn DSN]
[--no-transport]``.

Every figure is CPU time of the product's own code path, measured here:

- **decode**: :func:`pymigrate.envelope.decode_batch` + :func:`agent.codec.open_chunk`
  of every chunk (what the ingest does first), in this process;
- **write**: :meth:`cloud.ingest.IngestService.handle` on a :class:`PostgresStore`
  (plain tables; and TimescaleDB when ``--tsdb-dsn`` answers) minus decode: the
  idempotency state, the completeness ledger and the COPY, on the ingest's side; and the
  **database server's** CPU for it (the store's one backend, read from ``/proc``);
- **ack** (``--nodes`` RabbitMQ nodes of our own, quorum queue): one
  :class:`AmqpIngestServer` in this process with a handler that answers at once, fed by
  publishers in another process (real :class:`AmqpUplink`s, end-to-end acks): the
  ingest's CPU per batch to receive a delivery, publish the reply and ack it; and the
  **broker's** CPU per batch (every node, quorum replication included).

Batches are what an agent sends by default: one chunk of 600 readings (10 sensors, one
minute at 1 Hz; ``buffer.chunk_max_readings``), sealed with the default codec.

``model``: those figures applied to 10k, 100k and 1M devices at 10 sensors and 1 Hz,
raw and with 10-minute aggregates at the edge (4 functions per window: 4 readings per
600), one 600-reading batch per device per minute (raw). Cores are CPU only at 100%
(divide by the utilization you run at); I/O, queries and failover headroom are not in it.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing as mp
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from agent.codec import open_chunk, seal_chunk
from bench.common import drop_pg_schema, emit
from bench.ingest import DEFAULT_DSN, DEFAULT_TSDB, make_readings
from pymigrate.envelope import Batch, decode_batch, encode_batch

CHUNK = 600
SENSORS = 10
CODEC_BYTES_PER_READING = 0.94  # BENCHMARKS.md, chunk codec: 4 datasets at 600 points
PG_BYTES_PER_READING = 262  # BENCHMARKS.md, cloud ingest: plain PostgreSQL table + indexes
TSDB_COMPRESSED_BYTES_PER_READING = 12.0  # BENCHMARKS.md: TimescaleDB, chunks compressed


def payloads(devices: int, batches: int, seed: int = 7) -> list[tuple[str, bytes]]:
    """``batches`` wire batches of one 600-reading chunk each, spread over devices."""
    per_dev = max(1, batches // devices)
    data = make_readings(devices, devices * per_dev * CHUNK, seed=seed)
    out = []
    for dev, rs in data.items():
        for k in range(0, len(rs), CHUNK):
            out.append((dev, encode_batch(Batch(dev, f"{dev}-{k}", [seal_chunk(rs[k:k + CHUNK])]))))
    return out


def measure_decode(items: list[tuple[str, bytes]], rounds: int = 3) -> float:
    """CPU µs per reading to decode the envelope and open every chunk (best of rounds)."""
    best = math.inf
    for _ in range(rounds):
        n = 0
        t = time.process_time()
        for _, p in items:
            for c in decode_batch(p).chunks:
                n += len(open_chunk(c))
        best = min(best, (time.process_time() - t) / n * 1e6)
    return best


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _reachable(dsn: str) -> bool:
    from urllib.parse import urlparse

    u = urlparse(dsn)
    try:
        with socket.create_connection((u.hostname or "127.0.0.1", u.port or 5432), 1.0):
            return True
    except OSError:
        return False


async def measure_write(dsn: str, items: list[tuple[str, bytes]], *,
                        timescale: str) -> dict[str, Any]:
    """The ingest's CPU per reading for ``handle`` (decode + write) and the backend's."""
    from cloud.ingest import IngestService
    from cloud.stores.postgres import PostgresStore
    from transports.base import Incoming

    schema = f"pm_scale_{uuid.uuid4().hex[:8]}"
    store = PostgresStore(dsn, schema=schema, pool_min=1, pool_max=1, timescale=timescale)
    await store.open()
    try:
        backend = int(await store.pool.fetchval("SELECT pg_backend_pid()"))
        svc = IngestService(store)
        warm = items[: max(1, len(items) // 10)]
        for dev, p in warm:  # first writes create rows and plans: not the steady state
            await svc.handle(Incoming(p, "bench", dev, "bench"))
        rest = items[len(warm):]
        n = 0
        c0, b0, w0 = time.process_time(), _proc_cpu(backend), time.monotonic()
        for dev, p in rest:
            ack = await svc.handle(Incoming(p, "bench", dev, "bench"))
            if ack.status != "ok":
                raise RuntimeError(f"batch not stored: {ack}")
            n += ack.accepted
        cpu, db, wall = time.process_time() - c0, _proc_cpu(backend) - b0, time.monotonic() - w0
        return {"store": "timescaledb" if store.hypertable else "postgres",
                "readings": n, "handle_us_per_reading": round(cpu / n * 1e6, 2),
                "db_server_us_per_reading": round(db / n * 1e6, 2),
                "readings_per_s_one_in_flight": round(n / wall)}
    finally:
        await store.close()
        await drop_pg_schema(dsn, schema)


def _publisher(hosts: list[str], exchange: str, payload: bytes, n: int, links: int,
               done: Any) -> None:
    """Child process: ``links`` devices each send ``n`` batches, end-to-end acked."""
    from transports.amqp import AmqpUplink
    from transports.config import AmqpConfig

    async def run() -> None:
        cfg = AmqpConfig(hosts=hosts, exchange=exchange, connect_timeout_s=5.0)
        ups = [AmqpUplink(cfg, device_id=f"pub{i}") for i in range(links)]

        async def one(up: AmqpUplink) -> None:
            for k in range(n):
                await up.send(payload, batch_id=f"{up.device_id}-{k}", timeout=30)
            await up.close()

        await asyncio.gather(*(one(u) for u in ups))

    asyncio.run(run())
    done.set()


async def measure_transport(nodes: int, payload: bytes, readings: int, batches: int,
                            links: int = 8) -> dict[str, Any]:
    from bench._rabbit_cluster import RabbitCluster
    from pymigrate.types import Ack
    from transports.amqp import AmqpIngestServer
    from transports.base import Incoming
    from transports.config import AmqpConfig

    async with RabbitCluster(nodes) as cluster:
        cfg = AmqpConfig(hosts=cluster.hosts, exchange="scale", queue="scale.ingest",
                         connect_timeout_s=5.0, prefetch=32)
        got = 0
        all_in = asyncio.Event()

        async def answer(inc: Incoming) -> Ack:
            nonlocal got
            got += 1
            if got >= batches:
                all_in.set()
            return Ack(batch_id="", status="ok", t_recv_ms=0, t_send_ms=0, count=readings)

        server = AmqpIngestServer(cfg)
        await server.start(answer)
        try:
            per_link = max(1, batches // links)
            batches = per_link * links
            ctx = mp.get_context("spawn")
            done = ctx.Event()
            proc = ctx.Process(target=_publisher, args=(cluster.hosts, "scale", payload,
                                                        per_link, links, done))
            c0, b0, w0 = time.process_time(), cluster.cpu_seconds(), time.monotonic()
            proc.start()
            await asyncio.wait_for(all_in.wait(), 300)
            cpu, wall = time.process_time() - c0, time.monotonic() - w0
            broker = cluster.cpu_seconds() - b0
            await asyncio.to_thread(proc.join, 60)
        finally:
            await server.stop()
    return {"rabbitmq_nodes": nodes, "queue_type": "quorum", "batches": batches,
            "batch_readings": readings, "batch_bytes": len(payload),
            "ack_us_per_batch": round(cpu / batches * 1e6, 1),
            "broker_us_per_batch": round(broker / batches * 1e6, 1),
            "batches_per_s": round(batches / wall, 1), "publishers": links}


def model(decode_us: float, write_us: float, db_us: float, ack_us_batch: float,
          broker_us_batch: float) -> list[dict[str, Any]]:
    out = []
    for devices in (10_000, 100_000, 1_000_000):
        for label, ratio in (("raw 1 Hz", 1.0), ("10-min aggregates", 4 / 600)):
            r = devices * SENSORS * ratio  # readings/s reaching the cloud
            b = devices / 60.0  # batches/s: one per device per minute (raw)
            ingest = r * (decode_us + write_us) / 1e6 + b * ack_us_batch / 1e6
            out.append({
                "devices": devices, "data": label, "readings_per_s": round(r),
                "batches_per_s": round(b), "ingest_cores": round(ingest, 2),
                "db_server_cores": round(r * db_us / 1e6, 2),
                "broker_cores": round(b * broker_us_batch / 1e6, 2),
                "wire_mb_per_s": round(r * CODEC_BYTES_PER_READING / 1e6, 3),
                "pg_gb_per_day": round(r * 86_400 * PG_BYTES_PER_READING / 1e9, 1),
                "tsdb_compressed_gb_per_day": round(
                    r * 86_400 * TSDB_COMPRESSED_BYTES_PER_READING / 1e9, 1),
            })
    return out


async def run(a: argparse.Namespace) -> dict[str, Any]:
    items = payloads(20, a.batches)
    res: dict[str, Any] = {"decode_us_per_reading": round(measure_decode(items), 3)}
    stores = []
    for dsn, ts in ((a.dsn, "off"), (a.tsdb_dsn, "on")):
        if not dsn:
            continue
        if not _reachable(dsn):
            stores.append({"store": "timescaledb" if ts == "on" else "postgres",
                           "skipped": f"{dsn} not reachable"})
            continue
        w = await measure_write(dsn, items, timescale=ts)
        w["write_us_per_reading"] = round(w["handle_us_per_reading"]
                                          - res["decode_us_per_reading"], 2)
        stores.append(w)
    res["write"] = stores
    if not a.no_transport:
        from bench._rabbit_cluster import rabbitmq_missing

        why = rabbitmq_missing()
        res["transport"] = ({"skipped": why} if why else await measure_transport(
            a.nodes, items[0][1], CHUNK, a.transport_batches))
    pg = next((s for s in stores if s.get("store") == "postgres" and "skipped" not in s),
              None)
    tr = res.get("transport", {})
    if pg is not None and "ack_us_per_batch" in tr:
        res["model"] = model(res["decode_us_per_reading"], pg["write_us_per_reading"],
                             pg["db_server_us_per_reading"], tr["ack_us_per_batch"],
                             tr["broker_us_per_batch"])
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench scaling",
                                description=(__doc__ or "").split("\n")[0])
    p.add_argument("--batches", type=int, default=200, help="600-reading batches written")
    p.add_argument("--transport-batches", type=int, default=2000,
                   help="batches through the broker")
    p.add_argument("--nodes", type=int, default=3, help="RabbitMQ nodes (quorum queue)")
    p.add_argument("--dsn", default=DEFAULT_DSN, help="PostgreSQL (a throwaway schema)")
    p.add_argument("--tsdb-dsn", default=DEFAULT_TSDB, help="TimescaleDB ('' = skip)")
    p.add_argument("--no-transport", action="store_true", help="skip the broker part")
    a = p.parse_args(argv)
    from pymigrate.logsetup import setup_logging

    setup_logging("console", "error", stream=sys.stderr)
    t = time.monotonic()
    res = asyncio.run(run(a))
    res["wall_s"] = round(time.monotonic() - t, 1)
    emit("scaling", {"batches": a.batches, "transport_batches": a.transport_batches,
                     "batch_readings": CHUNK, "sensors": SENSORS, "nodes": a.nodes,
                     "codec_bytes_per_reading": CODEC_BYTES_PER_READING,
                     "pg_bytes_per_reading": PG_BYTES_PER_READING,
                     "tsdb_compressed_bytes_per_reading": TSDB_COMPRESSED_BYTES_PER_READING},
         res)
    return 0
