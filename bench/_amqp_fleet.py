"""In-process devices speaking AMQP through the product's own agent: for the cluster
benchmark and its integration test.

Each device is a real :class:`agent.supervisor.Agent` (ingest stage, durable SQLite
buffer, uploader with its retry controller, :class:`transports.amqp.AmqpUplink`), fed by
a :class:`HarnessSource` instead of a sensor. Running them in one process (one event
loop) instead of one ``pymigrate agent`` process each keeps 20+ devices affordable on two
cores; nothing between the source and the broker is replaced.

The harness keeps its own record of what it produced (:attr:`AmqpFleet.produced`):
every reading by its natural key ``(device, sensor, value)`` (values are unique per
device) with its timestamp. :func:`audit_rows` checks the store's rows against it reading
by reading; it never looks at what the agents or the cloud say about themselves.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from agent.config import parse_agent_config
from agent.sources.base import Emit, SourceBatch
from agent.supervisor import Agent
from pymigrate.types import Reading

Key = tuple[str, str, float]  # device, sensor, value


class HarnessSource:
    """``sensors`` readings every ``1 / rate_hz`` s of wall time, timestamps given (not
    corrected), values unique per device (``tick * sensors + s + 1``); every emitted
    reading goes into ``produced`` first. Stops by itself when ``stop`` is set."""

    name = "harness"

    def __init__(self, device_id: str, produced: dict[Key, int], *, sensors: int,
                 rate_hz: float, t0_ms: int) -> None:
        self.device_id = device_id
        self.produced = produced
        self.sensors = sensors
        self.period = 1.0 / rate_hz
        self.t0_ms = t0_ms
        self.stop = asyncio.Event()
        self.done = asyncio.Event()
        self.ticks = 0

    async def run(self, emit: Emit) -> None:
        try:
            nxt = time.monotonic()
            while not self.stop.is_set():
                ts = self.t0_ms + round(self.ticks * self.period * 1000)
                rs = []
                for s in range(self.sensors):
                    r = Reading(device_id=self.device_id, sensor=f"s{s:02d}", ts_ms=ts,
                                value=float(self.ticks * self.sensors + s + 1))
                    self.produced[(r.device_id, r.sensor, r.value)] = ts
                    rs.append(r)
                await emit(SourceBatch(rs, local_clock=False))
                self.ticks += 1
                nxt += self.period
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), max(0.0, nxt - time.monotonic()))
        finally:
            self.done.set()


class FleetDevice:
    def __init__(self, agent: Agent, source: HarnessSource) -> None:
        self.agent = agent
        self.source = source
        self.task: asyncio.Task[None] | None = None


class AmqpFleet:
    """``n`` in-process agents publishing to ``hosts`` (a RabbitMQ cluster)."""

    def __init__(self, n: int, hosts: list[str], workdir: Path, *, exchange: str,
                 routing_prefix: str = "up", sensors: int = 10, rate_hz: float = 1.0,
                 prefix: str = "dev", chunk_max_age_s: float = 1.0,
                 drain_timeout_s: float = 60.0) -> None:
        self.produced: dict[Key, int] = {}
        self.devices: list[FleetDevice] = []
        self.drain_timeout_s = drain_timeout_s
        t0 = time.time_ns() // 1_000_000
        for i in range(n):
            dev = f"{prefix}{i:03d}"
            cfg = parse_agent_config({
                "device": {"id": dev, "data_dir": str(workdir / dev)},
                "uplink": {"transports": ["amqp"], "amqp": {
                    "hosts": hosts, "exchange": exchange, "routing_prefix": routing_prefix,
                    "connect_timeout_s": 3.0}},
                "buffer": {"chunk_max_age_s": chunk_max_age_s, "chunk_max_readings": 500,
                           "commit_window_ms": 50},
                "retry": {"backoff_base_s": 0.2, "backoff_cap_s": 2.0, "seed": i,
                          "breaker_open_base_s": 1.0, "breaker_open_cap_s": 4.0,
                          "timeout_initial_s": 5.0, "timeout_max_s": 10.0},
                "pipeline": {"drain_timeout_s": drain_timeout_s},
            })
            src = HarnessSource(dev, self.produced, sensors=sensors, rate_hz=rate_hz, t0_ms=t0)
            self.devices.append(FleetDevice(Agent(cfg, sources=[src]), src))

    async def start(self) -> None:
        for d in self.devices:
            d.task = asyncio.create_task(d.agent.run(), name=f"fleet[{d.agent.device_id}]")

    def failed(self) -> list[str]:
        """Devices whose agent stopped with an error (a stage died)."""
        out = []
        for d in self.devices:
            if d.task is not None and d.task.done() and not d.task.cancelled() \
                    and d.task.exception() is not None:
                out.append(f"{d.agent.device_id}: {d.task.exception()!r}")
        return out

    async def stop(self) -> dict[str, Any]:
        """Stop producing, then stop every agent gracefully (each drains its buffer to the
        cloud within ``drain_timeout_s``). Returns the agents' own upload figures."""
        for d in self.devices:
            d.source.stop.set()
        await asyncio.gather(*(d.source.done.wait() for d in self.devices))
        t0 = time.monotonic()
        took: dict[str, float] = {}
        for d in self.devices:
            d.agent.request_stop()
            if d.task is not None:
                d.task.add_done_callback(
                    lambda _, dev=d.agent.device_id: took.setdefault(dev, time.monotonic() - t0))
        limit = self.drain_timeout_s + 30.0
        tasks = [d.task for d in self.devices if d.task is not None]
        _, pending = await asyncio.wait(tasks, timeout=limit)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        totals: collections.Counter[str] = collections.Counter()
        for d in self.devices:
            st = d.agent.uploader.stats()
            for k in ("batches_sent", "batches_acked", "batches_failed", "readings_acked",
                      "duplicates"):
                totals[k] += int(st.get(k, 0))
        slow = sorted(took.items(), key=lambda kv: -kv[1])[:3]
        return {"agents_stopped_cleanly": sum(d.agent.stopped_cleanly for d in self.devices),
                "slowest_drains_s": {k: round(v, 1) for k, v in slow},
                "agents_not_stopped": len(pending), "agent_errors": self.failed(),
                **dict(totals)}


def audit_rows(produced: dict[Key, int],
               rows: Iterable[tuple[str, str, float, int, int]]) -> dict[str, Any]:
    """Compare the store's rows ``(device, sensor, value, ts_ms, seq)`` with what the
    harness produced, reading by reading.

    ``lost``: produced, never stored. ``duplicated``: stored copies beyond the first of a
    reading or of a sequence number (whichever is more). ``foreign``: stored readings the
    harness never produced. ``ts_mismatch``: stored with another timestamp.
    """
    seen: collections.Counter[Key] = collections.Counter()
    seqs: collections.Counter[tuple[str, int]] = collections.Counter()
    foreign = ts_bad = rows_n = 0
    for dev, sensor, value, ts, seq in rows:
        rows_n += 1
        k = (dev, sensor, float(value))
        seen[k] += 1
        seqs[(dev, seq)] += 1
        want = produced.get(k)
        if want is None:
            foreign += 1
        elif want != ts:
            ts_bad += 1
    lost = sum(1 for k in produced if k not in seen)
    dup_keys = sum(c - 1 for c in seen.values() if c > 1)
    dup_seqs = sum(c - 1 for c in seqs.values() if c > 1)
    return {"produced": len(produced), "stored_rows": rows_n, "lost": lost,
            "duplicated": max(dup_keys, dup_seqs), "foreign": foreign, "ts_mismatch": ts_bad}
