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
import os
import random
import resource
import socket
import subprocess
import sys
import time
from collections import Counter
from typing import Any

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
                   tail_hours: float, profile: str = "unmetered") -> dict[str, Any]:
    clock = VirtualClock()
    buf = MemoryBuffer(clock)
    cloud = SimCloud()
    model = NetModel(loss=loss, outages=outages, rng=random.Random(seed))
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
    while clock.monotonic() < end:
        await advance_settled(clock, min(3600.0, end - clock.monotonic()))
        if prod.done() and len(buf) == 0 and buf.inflight == 0:
            break
    elapsed_h = clock.monotonic() / 3600
    task.cancel()
    prod.cancel()
    await asyncio.gather(task, prod, return_exceptions=True)
    if isinstance(up, Uploader):
        st = up.stats()
        by_batch, by_read, wakeups = up.batches_by_attempt, up.readings_by_attempt, st["wakeups"]
    else:
        by_batch, by_read, wakeups = up.batches_by_attempt, up.readings_by_attempt, up.wakeups
    attempts = [a for a, n in by_batch.items() for _ in range(n)]
    delays = [cloud.first_seen_ms[(DEVICE, s)] - created[s] for s in created
              if (DEVICE, s) in cloud.first_seen_ms]
    return {
        "delivered_within_3_attempts": round(sum(n for a, n in by_read.items() if a <= 3)
                                             / total, 4),
        "delivered_eventually": round(cloud.readings / total, 4),
        "attempts_per_batch": {"mean": round(sum(attempts) / max(1, len(attempts)), 3),
                               "p99": _pct(attempts, 0.99)},
        "wakeups_per_hour": round(wakeups / elapsed_h, 1),
        "bytes_on_wire_per_reading": round(uplink.wire_bytes / total, 3),
        "batches_acked": len(attempts),
        "send_attempts": uplink.attempts,
        "delivery_delay_s": {"p50": _pct(delays, 0.5) / 1000, "p99": _pct(delays, 0.99) / 1000},
        "virtual_hours": round(elapsed_h, 2),
    }


async def run_scenarios(args: argparse.Namespace) -> dict[str, Any]:
    chunks = make_chunks(args.hours, args.sensors, args.chunk_s, args.seed)
    scen: list[tuple[str, float, list[tuple[float, float]], str]] = [
        (f"loss_{int(p * 100)}pct", p, [], "unmetered") for p in LOSSES]
    scen.append(("outage_6h", 0.0, [(2 * 3600.0, 8 * 3600.0)], "unmetered"))
    scen.append(("outage_6h_loss_5pct", 0.05, [(2 * 3600.0, 8 * 3600.0)], "unmetered"))
    scen.append(("loss_10pct_battery_profile", 0.10, [], "battery"))
    out: dict[str, Any] = {}
    for name, loss, outages, profile in scen:
        row: dict[str, Any] = {}
        for kind in ("adaptive", "naive"):
            if kind == "naive" and profile != "unmetered":
                continue
            t = time.perf_counter()
            row[kind] = await simulate(kind, chunks, loss=loss, outages=outages,
                                       seed=args.seed, hours=args.hours,
                                       tail_hours=args.tail_hours, profile=profile)
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
    try:  # the real durable buffer when it is available
        from agent.buffer import open_buffer  # type: ignore[attr-defined]

        import tempfile

        tmp = tempfile.mkdtemp(prefix="pymigrate-cpu-")
        buf = await open_buffer(os.path.join(tmp, "buf.db"), clock=clock)
        kind = "sqlite"
    except Exception:  # noqa: BLE001 - fall back to the in-memory stand-in
        buf = MemoryBuffer(clock)
        kind = "memory"
    for _, c in make_chunks(1, 10, 60, 1):
        await buf.put(c)
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
    return {
        "buffer": kind,
        "wall_s": round(w1 - w0, 3),
        "cpu_s": round(c1 - c0, 5),
        "cpu_fraction": round((c1 - c0) / (w1 - w0), 6),
        "voluntary_ctx_switches": r1.ru_nvcsw - r0.ru_nvcsw,
        "connect_attempts": uplink.connects,
        "wakeups": st["wakeups"],
        "breaker": st["uplinks"][uplink.name]["breaker"],
        "pending_chunks": 60,
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
    ap.add_argument("--cpu-seconds", type=float, default=60.0,
                    help="wall seconds of the disconnected-agent CPU measurement (0: skip)")
    ap.add_argument("--cpu-child", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.cpu_child is not None:
        print(json.dumps(asyncio.run(cpu_child(args.cpu_child))))
        return 0
    results: dict[str, Any] = {"scenarios": asyncio.run(run_scenarios(args))}
    if args.cpu_seconds > 0:
        results["cpu_disconnected"] = measure_cpu(args.cpu_seconds)
    emit("retry", {"hours": args.hours, "tail_hours": args.tail_hours,
                   "sensors": args.sensors, "sensor_hz": 1, "chunk_s": args.chunk_s,
                   "seed": args.seed, "link": "per-packet loss, no link retransmission, "
                   "100 ms one-way, 250 kbit/s, MTU 1200",
                   "naive": "64 KiB batches, 10 s timeout, 30 s fixed retry",
                   "cpu_seconds": args.cpu_seconds}, results)
    return 0
