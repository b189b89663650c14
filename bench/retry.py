"""``python -m bench retry``: the adaptive retry controller against a naive fixed-interval
retry, on virtual time over a simulated lossy link, plus real CPU while disconnected.

Simulated part: one gateway (``--sensors`` sensors at 1 Hz, a chunk sealed every
``--chunk-s`` seconds with the real columnar-zstd codec) for ``--hours`` of virtual time,
the same readings fed to (a) ``agent.uploader.Uploader`` with the default ``RetryConfig``
and (b) a naive uploader (fixed 64 KiB batches, fixed 10 s timeout, fixed 30 s retry
interval, no jitter, no breaker). The link is ``simulators.netmodel.NetModel``: per-packet
loss, no link-level retransmission (a lost packet fails the attempt: the worst case for
the controller), 100 ms one-way latency, 250 kbit/s; the 6 h outage makes the cloud
unreachable from hour 2 to hour 8. Figures per scenario and uploader:

* ``delivered_within_3_attempts``: fraction of generated readings whose batch the agent
  saw acked by its 3rd attempt;
* ``delivered_eventually``: fraction the cloud stored by the end of the run;
* ``attempts_per_batch``: mean and p99 over acked batches;
* ``wakeups_per_hour``: the uploader's returns from sleep (data, deadlines, completions);
* ``bytes_on_wire_per_reading``: both directions, packet headers included.

CPU part: a child process runs the real ``Uploader`` on the wall clock with data pending
and an uplink whose TCP connect to a closed loopback port is refused, for
``--cpu-seconds`` (default 60), and reports CPU time / wall time of that window.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import Any

import structlog

from agent.codec import seal_chunk
from agent.retry import RetryConfig
from agent.uploader import Uploader
from bench.common import emit
from pymigrate.clock import Clock, VirtualClock, WallClock
from pymigrate.envelope import Batch, encode_batch
from pymigrate.errors import TransportError
from pymigrate.types import Ack, Chunk, Priority, Reading
from simulators.membuffer import MemoryBuffer
from simulators.netmodel import NetModel, SimCloud, SimulatedUplink, advance_settled

DEVICE = "gw-bench"
LOSSES = (0.0, 0.05, 0.10, 0.20, 0.30)


# ---------------------------------------------------------------------------- data
def make_chunks(hours: float, sensors: int, chunk_s: int, seed: int) -> list[tuple[float, Chunk]]:
    """(virtual second the chunk is sealed, chunk) for a 1 Hz gateway."""
    rng = random.Random(seed)
    t0 = 1_767_225_600_000
    out: list[tuple[float, Chunk]] = []
    seq = 1
    vals = [20.0 + i for i in range(sensors)]
    for k in range(int(hours * 3600 // chunk_s)):
        rs = []
        for s in range(chunk_s):
            for i in range(sensors):
                vals[i] = round(vals[i] + rng.gauss(0, 0.05), 2)
                rs.append(Reading(DEVICE, f"s{i}", t0 + (k * chunk_s + s) * 1000, vals[i],
                                  Priority.NORMAL, seq=seq))
                seq += 1
        out.append(((k + 1) * chunk_s, seal_chunk(rs)))
    return out


# ---------------------------------------------------------------------------- naive
class NaiveUploader:
    """Fixed batches, fixed timeout, fixed retry interval: the baseline."""

    def __init__(self, buffer: MemoryBuffer, uplink: SimulatedUplink, clock: Clock, *,
                 batch_bytes: int = 64 * 1024, timeout_s: float = 10.0,
                 interval_s: float = 30.0) -> None:
        self.buffer, self.uplink, self.clock = buffer, uplink, clock
        self.batch_bytes, self.timeout_s, self.interval_s = batch_bytes, timeout_s, interval_s
        self.attempts: dict[int, int] = {}
        self.batches_by_attempt: Counter[int] = Counter()
        self.readings_by_attempt: Counter[int] = Counter()
        self.wakeups = 0
        self.n = 0

    async def run(self) -> None:
        while True:
            fut = asyncio.ensure_future(self.buffer.wait_for_data())
            await asyncio.sleep(0)
            if not fut.done():
                await fut
                self.wakeups += 1
            items = await self.buffer.take(self.batch_bytes, 1 << 20)
            if not items:
                continue
            attempt = 1 + max(self.attempts.get(i.id, 0) for i in items)
            for i in items:
                self.attempts[i.id] = attempt
            self.n += 1
            payload = encode_batch(Batch(DEVICE, f"n{self.n}", [i.chunk for i in items],
                                         self.clock.time_ms()))
            try:
                await self.uplink.send(payload, batch_id=f"n{self.n}", timeout=self.timeout_s)
            except TransportError:
                await self.buffer.release([i.id for i in items])
                await self.clock.sleep(self.interval_s)
                self.wakeups += 1
                continue
            await self.buffer.ack([i.id for i in items])
            self.batches_by_attempt[attempt] += 1
            self.readings_by_attempt[attempt] += sum(i.chunk.count for i in items)


# ---------------------------------------------------------------------------- sim
def _pct(values: list[int], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return float(values[min(len(values) - 1, int(q * len(values)))])


async def simulate(kind: str, chunks: list[tuple[float, Chunk]], *, loss: float,
                   outages: list[tuple[float, float]], seed: int, hours: float,
                   tail_hours: float, profile: str = "unmetered",
                   link_retries: int = 0, quota_per_s: float = 0.0) -> dict[str, Any]:
    """One run; returns raw tallies (see :func:`summarise`)."""
    clock = VirtualClock()
    buf = MemoryBuffer(clock)
    cloud = SimCloud(quota_per_s=quota_per_s, burst=1.0)
    model = NetModel(loss=loss, outages=outages, rng=random.Random(seed),
                     link_retries=link_retries)
    uplink = SimulatedUplink(model, cloud, clock, name="sim")
    up: Uploader | NaiveUploader
    if kind == "adaptive":
        up = Uploader(buf, [uplink], device_id=DEVICE, clock=clock,
                      config=RetryConfig(seed=seed, profile=profile))
    else:
        up = NaiveUploader(buf, uplink, clock)
    created: dict[int, int] = {}

    async def produce() -> None:
        for t, c in chunks:
            await clock.sleep_until(t)
            created[c.seq_first] = clock.time_ms()
            buf.put_nowait(c)

    total = sum(c.count for _, c in chunks)
    prod = asyncio.create_task(produce())
    task = asyncio.create_task(up.run())
    end = hours * 3600 + tail_hours * 3600

    def woken() -> int:
        return int(up.counts["wakeups"]) if isinstance(up, Uploader) else up.wakeups

    marks: dict[float, int] = {}  # wake-ups counted at the outage edges
    edges = sorted({t for o in outages for t in o})
    while clock.monotonic() < end:
        nxt = min([e for e in edges if e > clock.monotonic()] + [clock.monotonic() + 3600.0,
                                                                  end])
        await advance_settled(clock, nxt - clock.monotonic())
        if clock.monotonic() in edges:
            marks[clock.monotonic()] = woken()
        if prod.done() and len(buf) == 0 and buf.inflight == 0:
            break
    task.cancel()
    prod.cancel()
    await asyncio.gather(task, prod, return_exceptions=True)
    if isinstance(up, Uploader):
        st = up.stats()
        by_batch, by_read, wakeups = up.batches_by_attempt, up.readings_by_attempt, st["wakeups"]
    else:
        by_batch, by_read, wakeups = up.batches_by_attempt, up.readings_by_attempt, up.wakeups
    return {
        "total": total,
        "within3": sum(n for a, n in by_read.items() if a <= 3),
        "stored": cloud.readings,
        "attempts": [a for a, n in by_batch.items() for _ in range(n)],
        "wakeups": wakeups,
        "hours": clock.monotonic() / 3600,
        "wire": uplink.wire_bytes,
        "sends": uplink.attempts,
        "throttled": cloud.throttled,
        "delays": [cloud.first_seen_ms[(DEVICE, s)] - created[s] for s in created
                   if (DEVICE, s) in cloud.first_seen_ms],
        "outage_wakeups": sum(marks.get(b, 0) - marks.get(a, 0) for a, b in outages),
        "outage_hours": sum(b - a for a, b in outages) / 3600,
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool the runs of several seeds (same data, independent loss patterns)."""
    total = sum(r["total"] for r in runs)
    attempts = [a for r in runs for a in r["attempts"]]
    delays = [d for r in runs for d in r["delays"]]
    return {
        "delivered_within_3_attempts": round(sum(r["within3"] for r in runs) / total, 4),
        "delivered_within_3_attempts_per_seed": [round(r["within3"] / r["total"], 4)
                                                 for r in runs],
        "delivered_eventually": round(sum(r["stored"] for r in runs) / total, 4),
        "attempts_per_batch": {"mean": round(sum(attempts) / max(1, len(attempts)), 3),
                               "p99": _pct(attempts, 0.99), "max": max(attempts, default=0)},
        "wakeups_per_hour": round(sum(r["wakeups"] for r in runs)
                                  / sum(r["hours"] for r in runs), 1),
        "bytes_on_wire_per_reading": round(sum(r["wire"] for r in runs) / total, 3),
        **({"wakeups_per_hour_during_outage": round(
            sum(r["outage_wakeups"] for r in runs) / sum(r["outage_hours"] for r in runs), 1)}
           if runs[0]["outage_hours"] else {}),
        "batches_acked": len(attempts),
        "send_attempts": sum(r["sends"] for r in runs),
        "throttled_responses": sum(r["throttled"] for r in runs),
        "delivery_delay_s": {"p50": _pct(delays, 0.5) / 1000, "p99": _pct(delays, 0.99) / 1000},
    }


async def run_scenarios(args: argparse.Namespace) -> dict[str, Any]:
    chunks = make_chunks(args.hours, args.sensors, args.chunk_s, args.seed)
    outage = [(2 * 3600.0, 8 * 3600.0)]
    # name, loss, outages, profile, link retransmissions, cloud quota (batches/s)
    scen: list[tuple[str, float, list[tuple[float, float]], str, int, float]] = [
        (f"loss_{int(p * 100)}pct", p, [], "unmetered", 0, 0.0) for p in LOSSES]
    scen += [
        ("outage_6h", 0.0, outage, "unmetered", 0, 0.0),
        ("outage_6h_loss_5pct", 0.05, outage, "unmetered", 0, 0.0),
        ("loss_10pct_battery_profile", 0.10, [], "battery", 0, 0.0),
        ("loss_20pct_link_retransmit_2", 0.20, [], "unmetered", 2, 0.0),
        ("loss_30pct_link_retransmit_2", 0.30, [], "unmetered", 2, 0.0),
        # the cloud admits one batch per 5 minutes (token bucket, burst 1): retry-after
        ("throttled_cloud_1_batch_per_5min", 0.0, [], "unmetered", 0, 1 / 300),
    ]
    out: dict[str, Any] = {}
    for name, loss, outages, profile, retx, quota in scen:
        if args.only and not any(o in name for o in args.only.split(",")):
            continue
        row: dict[str, Any] = {}
        for kind in ("adaptive", "naive"):
            if kind == "naive" and profile != "unmetered":
                continue  # the naive uploader has no profile: its unmetered row applies
            t = time.perf_counter()
            runs = [await simulate(kind, chunks, loss=loss, outages=outages,
                                   seed=args.seed + k, hours=args.hours,
                                   tail_hours=args.tail_hours, profile=profile,
                                   link_retries=retx, quota_per_s=quota)
                    for k in range(args.seeds)]
            row[kind] = summarise(runs)
            row[kind]["sim_wall_s"] = round(time.perf_counter() - t, 2)
        out[name] = row
    return out


# ---------------------------------------------------------------------------- CPU
class RefusedUplink:
    """A TCP uplink whose broker port is closed: every connect is refused."""

    name = "tcp-refused"
    max_payload = 256 * 1024
    end_to_end = True

    def __init__(self, port: int) -> None:
        self.port = port
        self.connects = 0

    async def connect(self) -> None:
        self.connects += 1
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError as exc:
            raise TransportError(f"connect 127.0.0.1:{self.port}: {exc}") from exc
        writer.close()  # pragma: no cover - the port is closed
        raise TransportError("unexpected listener")  # pragma: no cover

    async def send(self, payload: bytes, *, batch_id: str,
                   timeout: float) -> Ack:  # noqa: ASYNC109 - Uplink contract
        raise TransportError("not connected")  # pragma: no cover - connect always fails

    async def close(self) -> None:
        return None


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when we return: connects are refused


async def cpu_child(seconds: float) -> dict[str, Any]:
    clock = WallClock()
    buf: Any
    tmp = tempfile.mkdtemp(prefix="pymigrate-cpu-")
    try:  # the real durable buffer (SQLite WAL) when it is available
        from agent.buffer import BufferConfig, DurableBuffer

        buf = DurableBuffer(BufferConfig(path=os.path.join(tmp, "buf.db")), clock=clock)
        await buf.open()
        rng = random.Random(1)
        for k in range(6):  # six sealed chunks of 600 readings pending
            await buf.append([Reading(DEVICE, f"s{i % 10}", clock.time_ms() - 3600_000 + i,
                                      rng.random(), Priority.NORMAL)
                              for i in range(k * 600, (k + 1) * 600)])
        await buf.flush()
        kind = "sqlite"
    except ImportError:
        buf = MemoryBuffer(clock)
        for _, c in make_chunks(0.1, 10, 60, 1):
            await buf.put(c)
        kind = "memory"
    uplink = RefusedUplink(_closed_port())
    up = Uploader(buf, [uplink], device_id=DEVICE, clock=clock, config=RetryConfig())
    task = asyncio.create_task(up.run())
    await asyncio.sleep(0.2)  # let the first attempts happen before measuring steady state
    c0, w0 = time.process_time(), time.monotonic()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    await asyncio.sleep(seconds)
    c1, w1 = time.process_time(), time.monotonic()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    st = up.stats()
    pending = await buf.take(1 << 30, 1 << 20)
    if kind == "sqlite":
        await buf.close()
    shutil.rmtree(tmp, ignore_errors=True)
    return {
        "buffer": kind,
        "wall_s": round(w1 - w0, 3),
        "cpu_s": round(c1 - c0, 5),
        "cpu_fraction": round((c1 - c0) / (w1 - w0), 6),
        "voluntary_ctx_switches": r1.ru_nvcsw - r0.ru_nvcsw,
        "connect_attempts": uplink.connects,
        "wakeups": st["wakeups"],
        "breaker": st["uplinks"][uplink.name]["breaker"],
        "pending_chunks": len(pending),
    }


def measure_cpu(seconds: float) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "bench", "retry", "--cpu-child", str(seconds)],
                          capture_output=True, text=True, timeout=seconds + 60, check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench retry")
    ap.add_argument("--hours", type=float, default=24.0, help="virtual hours of data")
    ap.add_argument("--tail-hours", type=float, default=24.0,
                    help="virtual hours allowed after the data ends")
    ap.add_argument("--sensors", type=int, default=10)
    ap.add_argument("--chunk-s", type=int, default=60)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--seeds", type=int, default=3,
                    help="independent loss patterns per scenario (pooled)")
    ap.add_argument("--only", default="", help="comma-separated scenario name filters")
    ap.add_argument("--cpu-seconds", type=float, default=60.0,
                    help="wall seconds of the disconnected-agent CPU measurement (0: skip)")
    ap.add_argument("--cpu-child", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not structlog.is_configured():  # stdout carries the JSON: logs go to stderr
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr),
                            wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if args.cpu_child is not None:
        print(json.dumps(asyncio.run(cpu_child(args.cpu_child))))
        return 0
    results: dict[str, Any] = {"scenarios": asyncio.run(run_scenarios(args))}
    if args.cpu_seconds > 0:
        results["cpu_disconnected"] = measure_cpu(args.cpu_seconds)
    emit("retry", {"hours": args.hours, "tail_hours": args.tail_hours,
                   "sensors": args.sensors, "sensor_hz": 1, "chunk_s": args.chunk_s,
                   "seed": args.seed, "seeds": args.seeds,
                   "link": "per-packet loss, no link retransmission unless the scenario says "
                   "link_retransmit_N (then N resends per packet, 1 s doubling RTO), "
                   "100 ms one-way, 250 kbit/s, MTU 1200",
                   "naive": "64 KiB batches, 10 s timeout, 30 s fixed retry",
                   "cpu_seconds": args.cpu_seconds}, results)
    return 0
