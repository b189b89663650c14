"""Transport benchmark: ``python -m bench transports [--devices N] [--readings R]
[--seconds S] [--max-batches B] [--seed K] [--only mqtt,coap,amqp]``.

Per protocol (MQTT via Mosquitto, AMQP via RabbitMQ, CoAP via an in-process aiocoap
ingest), ``devices`` simulated devices each send batches of ``readings`` readings one
after another (one in flight per device, end-to-end acks, SQLite store behind the real
:class:`cloud.ingest.IngestService`) through the fault proxy, over loopback:

- ``clean``: the proxy forwards without faults;
- ``faults``: 5 ms +- 5 ms one-way latency, 2% loss (UDP drop; TCP 100 ms stall),
  TCP resets at 0.5% per chunk, a 0.5 s outage (reset) after 1 s.

Each scenario stops after ``seconds`` or ``max_batches`` acked batches per device, and the
device retries on TransportError as the uploader would. Figures: acked batches/s and
readings/s, payload (encoded batch) bytes per reading, wire bytes / payload bytes (both
directions through the proxy, including acks, retries, connection setup and protocol
headers; TCP/IP headers are not counted), send latency p50/p95, attempts and errors.

MQTT uses a private Mosquitto started on a free port with ``set_tcp_nodelay true`` when
the binary is installed (the system broker's default Nagle adds ~40 ms per hop to small
request/response exchanges on loopback), else the broker on 127.0.0.1:1883.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import msgspec

from agent.codec import seal_chunk
from bench.common import emit
from cloud.ingest import IngestService
from cloud.stores.sqlite import SqliteStore
from pymigrate.envelope import Batch, encode_batch
from pymigrate.errors import PayloadRejected, ThrottledError, TransportError
from pymigrate.types import Priority, Reading
from simulators.netproxy import FaultProxy, UdpFaultProxy
from transports.config import AmqpConfig, CoapConfig, MqttConfig, TransportConfig
from transports.registry import build_ingest_server, build_uplink

T0 = 1_767_225_600_000
FAULTS_TCP = dict(latency_ms=5.0, jitter_ms=5.0, loss=0.02, stall_ms=100.0, reset_prob=0.005)
FAULTS_UDP = dict(latency_ms=5.0, jitter_ms=5.0, loss=0.02)


def _up(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _mosquitto_binary() -> str | None:
    found = shutil.which("mosquitto")
    if found is None and Path("/usr/sbin/mosquitto").exists():  # sbin is not on every PATH
        found = "/usr/sbin/mosquitto"
    return found


@contextlib.asynccontextmanager
async def _private_mosquitto(workdir: Path) -> AsyncIterator[tuple[int, str]]:
    binary = _mosquitto_binary()
    if binary is None:
        yield 1883, "system mosquitto 127.0.0.1:1883"
        return
    port = _free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"persistence false\nset_tcp_nodelay true\nlistener {port} 127.0.0.1\n"
                    "allow_anonymous true\n")
    proc = await asyncio.create_subprocess_exec(binary, "-c", str(conf),
                                                stdout=subprocess.DEVNULL,
                                                stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if _up("127.0.0.1", port):
                break
            await asyncio.sleep(0.05)
        yield port, "private mosquitto (set_tcp_nodelay true)"
    finally:
        proc.kill()
        await proc.wait()


def _batches(device: str, readings: int, rng: random.Random) -> list[tuple[str, bytes, int]]:
    """Encoded batches of a weather-station-like device: 4 sensors at 1 Hz, random walks."""
    out = []
    sensors = ["temp_c", "rh_pct", "pressure_hpa", "wind_ms"]
    level = [20.0, 55.0, 1013.0, 3.0]
    step = [0.05, 0.2, 0.02, 0.3]
    seq = 1
    for b in range(400):
        rs = []
        for i in range(readings):
            k = i % len(sensors)
            level[k] += rng.gauss(0.0, step[k])
            rs.append(Reading(device, sensors[k], T0 + (seq // 4) * 1000,
                              round(level[k], 2), Priority.NORMAL, seq))
            seq += 1
        chunk = seal_chunk(rs, "columnar-zstd")
        batch_id = f"{device}-{b:05d}"
        out.append((batch_id, encode_batch(Batch(device, batch_id, [chunk], sent_ms=T0)),
                    readings))
    return out


async def _device(cfg: TransportConfig, device: str, batches: list[tuple[str, bytes, int]],
                  stop_at: float, max_batches: int, stats: dict[str, Any]) -> None:
    up = build_uplink(cfg, device)
    acked: set[int] = stats["acked_idx"].setdefault(device, set())
    try:
        for idx, (batch_id, payload, n) in enumerate(batches[:max_batches]):
            while True:
                if time.monotonic() > stop_at:
                    return
                t0 = time.monotonic()
                stats["attempts"] += 1
                stats["tried_idx"].setdefault(device, set()).add(idx)
                try:
                    await up.send(payload, batch_id=batch_id, timeout=2.0)
                except ThrottledError as exc:
                    stats["errors"] += 1
                    await asyncio.sleep(min(exc.retry_after_s, 0.5))
                    continue
                except PayloadRejected:
                    raise
                except TransportError:
                    stats["errors"] += 1
                    await asyncio.sleep(0.05)
                    continue
                stats["latency"].append(time.monotonic() - t0)
                stats["acked"] += 1
                acked.add(idx)
                stats["readings"] += n
                stats["payload_bytes"] += len(payload)
                break
    finally:
        await up.close()


async def _audit(store: SqliteStore, stats: dict[str, Any], per: int) -> dict[str, int]:
    """Reading by reading: every acked batch's sequence numbers are stored once; what is
    stored beyond them belongs to a batch that was sent but whose ack the deadline cut."""
    rows = list(await store.db.execute_fetchall("SELECT device_id, seq FROM readings"))
    seen: dict[str, set[int]] = {}
    twice = 0
    for dev, seq in rows:
        got = seen.setdefault(str(dev), set())
        twice += int(seq) in got
        got.add(int(seq))
    lost = unacked = never = 0
    for dev, idx in stats["acked_idx"].items():
        want = {i * per + k + 1 for i in idx for k in range(per)}
        got = seen.get(dev, set())
        lost += len(want - got)
        tried = {i * per + k + 1 for i in stats["tried_idx"].get(dev, set()) for k in range(per)}
        extra = got - want
        unacked += len(extra & tried)
        never += len(extra - tried)
    return {"acked_not_stored": lost, "stored_twice": twice,
            "stored_ack_cut_by_deadline": unacked, "stored_never_sent": never}


async def _scenario(kind: str, faulty: bool, args: argparse.Namespace, mqtt_port: int,
                    workdir: Path, seed: int) -> dict[str, Any]:
    uniq = f"{random.Random(seed).getrandbits(40):010x}"
    server_cfg: TransportConfig
    proxy: FaultProxy | UdpFaultProxy
    if kind == "mqtt":
        server_cfg = MqttConfig(port=mqtt_port, prefix=f"pmbench/{uniq}",
                                share_group=f"b{uniq}", connect_timeout_s=2.0)
        proxy = FaultProxy(("127.0.0.1", mqtt_port), rng=random.Random(seed))
    elif kind == "amqp":
        server_cfg = AmqpConfig(exchange=f"pmbench.{uniq}", queue=f"pmbench.{uniq}.ingest",
                                connect_timeout_s=2.0)
        proxy = FaultProxy(("127.0.0.1", 5672), rng=random.Random(seed))
    else:
        port = _free_port(socket.SOCK_DGRAM)
        server_cfg = CoapConfig(port=port, ack_timeout_s=0.25)
        proxy = UdpFaultProxy(("127.0.0.1", port), rng=random.Random(seed))
    store = SqliteStore(workdir / f"{kind}-{int(faulty)}-{uniq}.db")
    await store.open()
    server = build_ingest_server(server_cfg)
    await server.start(IngestService(store).handle)
    await proxy.start()
    dev_cfg = msgspec.structs.replace(server_cfg, port=proxy.port())
    rng = random.Random(seed)
    devices = [f"bench-{kind}-{uniq}-{i}" for i in range(args.devices)]
    plans = {d: _batches(d, args.readings, rng) for d in devices}
    if faulty:
        proxy.set(None, **(FAULTS_UDP if kind == "coap" else FAULTS_TCP))
        proxy.schedule_outage(1.0, 0.5, mode="reset")
    stats: dict[str, Any] = dict(acked=0, attempts=0, errors=0, readings=0, payload_bytes=0,
                                 latency=[], acked_idx={}, tried_idx={})
    t0 = time.monotonic()
    try:
        await asyncio.gather(*(_device(dev_cfg, d, plans[d], t0 + args.seconds,
                                       args.max_batches, stats) for d in devices))
        elapsed = time.monotonic() - t0
        counters = proxy.counters()
        stored = await store.count()
        audit = await _audit(store, stats, args.readings)
    finally:
        await proxy.close()
        if hasattr(server, "delete_topology"):
            await server.delete_topology()
        await server.stop()
        await store.close()
    lat = sorted(stats["latency"]) or [float("nan")]
    payload = stats["payload_bytes"] or 1
    return {
        "acked_batches": stats["acked"],
        "seconds": round(elapsed, 2),
        "batches_per_s": round(stats["acked"] / elapsed, 1),
        "readings_per_s": round(stats["readings"] / elapsed, 0),
        "payload_bytes_per_reading": round(stats["payload_bytes"] / max(1, stats["readings"]), 3),
        "wire_bytes_up": counters.bytes_up,
        "wire_bytes_down": counters.bytes_down,
        "wire_over_payload": round(counters.bytes_total / payload, 3),
        "wire_up_over_payload": round(counters.bytes_up / payload, 3),
        "latency_ms_p50": round(statistics.median(lat) * 1000, 2),
        "latency_ms_p95": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))] * 1000, 2),
        "attempts": stats["attempts"],
        "errors": stats["errors"],
        "resets": counters.resets,
        "dropped_or_stalled": counters.dropped + counters.stalled,
        "stored_readings": stored,
        **audit,
        "exactly_once": audit["acked_not_stored"] == 0 and audit["stored_twice"] == 0
        and audit["stored_never_sent"] == 0,
    }


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="pm-bench-transports-") as tmp:
        workdir = Path(tmp)
        async with _private_mosquitto(workdir) as (mqtt_port, broker):
            results["mqtt_broker"] = broker
            for i, kind in enumerate(args.only):
                if kind == "mqtt" and not _up("127.0.0.1", mqtt_port):
                    results[kind] = {"skipped": f"no MQTT broker on {mqtt_port}"}
                    continue
                if kind == "amqp" and not _up("127.0.0.1", 5672):
                    results[kind] = {"skipped": "no RabbitMQ on 127.0.0.1:5672"}
                    continue
                results[kind] = {}
                for j, faulty in enumerate((False, True)):
                    name = "faults" if faulty else "clean"
                    results[kind][name] = await _scenario(kind, faulty, args, mqtt_port,
                                                          workdir, args.seed + 10 * i + j)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench transports")
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--readings", type=int, default=100, help="readings per batch")
    p.add_argument("--seconds", type=float, default=8.0, help="bound per scenario")
    p.add_argument("--max-batches", type=int, default=250, help="per device and scenario")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--only", type=lambda s: [x for x in s.split(",") if x],
                   default=["mqtt", "coap", "amqp"])
    args = p.parse_args(list(argv or []))
    t0 = time.monotonic()
    results = asyncio.run(_run(args))
    results["total_seconds"] = round(time.monotonic() - t0, 1)
    emit("transports", {
        "devices": args.devices, "readings_per_batch": args.readings,
        "seconds_bound": args.seconds, "max_batches": args.max_batches, "seed": args.seed,
        "faults_tcp": FAULTS_TCP, "faults_udp": FAULTS_UDP,
        "outage": "0.5 s reset after 1 s (faults scenario)", "codec": "columnar-zstd",
        "store": "sqlite", "one_in_flight_per_device": True}, results)
    return 0
