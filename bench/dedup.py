"""Dedup + time reconciliation benchmark, through the real product path:
``python -m bench dedup [--devices N] [--sensors S] [--period-s P] [--hours H] [--seed K]
...``.

A seeded simulation with ground truth. Each device (a gateway running the agent) has its
own RTC and monotonic clock (one crystal: offset up to +-``offset_max_s``, drift up to
+-``drift_max_ppm``); ``rtc_reset_share`` of devices (at least one) see the RTC jump to
1970 mid-day while the agent keeps running. Each device samples ``sensors`` sensors
every ``period_s`` (random phase); ``gateway_share`` of all sensors are also heard by a
second, random gateway (+0..20 ms radio jitter, stamped by that gateway's RTC).

Duplicates come from: QoS 1 redeliveries (``qos1_share`` of source messages delivered
again 0.1..30 s later); lost acks (``resend_share`` of transmissions: the chunks go back
to the buffer and are sent again next cycle, same seqs); agent restarts
(``restarts_per_day`` per device, Poisson; ``crash_share`` of them a ``kill -9``, the rest
a graceful stop): a crash loses the clock model and the in-memory dedup window, leaves
the last batch the cloud acked in the buffer (its delete never committed, so it is sent
again) and, at the worst moment, makes the source redeliver the whole source batch the
agent had just committed (its ack never reached the broker); and the second gateway.

The path is the product's, on real files (``workdir``, default a temporary directory on
``/dev/shm`` when present: the figures are about duplicates, not fsync latency):

* per device, the agent's :class:`agent.pipeline.IngestStage` (edge
  :class:`agent.dedup.Deduplicator` -> :class:`agent.timesync.TimeCorrector` -> validator)
  over a real :class:`agent.buffer.DurableBuffer` (SQLite). Source batches carry an ack,
  as a QoS 1 source's do, so the fingerprints they admitted are committed with them.
  A crash cancels the buffer's tasks and drops its connection without flushing (what
  ``kill -9`` leaves on disk); a graceful stop closes it. Either way the next agent
  reopens the file and restores the dedup window (``IngestStage.restore``);
* uploads: the buffer's sealed chunks in a real envelope (:func:`pymigrate.envelope.
  encode_batch`, with the buffer's stream identity), acked chunks deleted from the buffer;
  each acked transmission gives one NTP sample with random asymmetric delays (up 20 ms +
  exp(80 ms), down 20 ms + exp(30 ms), 5% spikes of +0.5..3 s one way); at start a burst
  of ``sync_burst`` pings, then a ping every ``warmup_ping_s`` while the corrector
  ``wants_samples()``;
* cloud, all batches in arrival order: :class:`cloud.ingest.IngestService` (sequence
  idempotency per stream, :class:`cloud.dedup.GatewayDeduper` with ``best_quality``)
  writing to a real :class:`cloud.stores.SqliteStore`; ``ingest_restarts`` times the
  service and the store are closed and reopened (the deduper's memory is lost: the
  product does not rebuild it from the store).

There is no natural-key step: no store has one, so a reading redelivered under a new
sequence number is stored twice unless the edge window caught it. The result is read
back from the store row by row and matched against the benchmark's own record of which
events are distinct (device, sensor, device timestamp -> event).

Every copy of an event that enters the pipeline (each source delivery, each gateway
reception, each re-transmitted reading) counts; ``removed = copies - stored`` per event.
``precision`` = correct removals / removals, ``recall`` = correct removals / redundant
copies, ``false_drops`` = events stored zero times, ``duplicates_stored`` = stored copies
beyond one (split into ``same_gateway``: one gateway's reading stored under two sequence
numbers, and ``cross_gateway``: two gateways' copies both kept). Time error = stored ts -
true event time. ``completeness`` is the store's own ledger (``pymigrate cloud
completeness``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from agent.aggregate import AggregationConfig, Aggregator
from agent.buffer import BufferConfig, DurableBuffer
from agent.codec import open_chunk
from agent.config import ValidationConfig
from agent.dedup import DedupConfig, Deduplicator
from agent.pipeline import IngestStage, PriorityMap
from agent.sources.base import SourceBatch
from agent.timesync import TimeCorrector, TimeSyncConfig
from agent.validate import Validator
from bench.common import emit
from cloud.dedup import ConflictPolicy, GatewayDeduper
from cloud.ingest import IngestService
from cloud.stores import SqliteStore
from pymigrate.envelope import Batch, encode_batch
from pymigrate.types import Quality, Reading
from transports.base import Incoming

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
EPOCH_1970 = 5_000


class DeviceClock:
    """A device's RTC and monotonic clock as functions of true time ``t`` (ms).

    Both run ``1 + drift`` fast; an optional RTC reset at ``reset_at`` restarts the RTC
    near the epoch while monotonic time goes on. Implements :class:`pymigrate.clock.Clock`
    on virtual time: the benchmark moves ``t``; sleepers wake when their deadline passed.
    """

    def __init__(self, offset_ms: float, drift_ppm: float, boot_s: float,
                 reset_at: float | None) -> None:
        self.k = 1.0 + drift_ppm * 1e-6
        self.boot_s = boot_s
        self.base = T0 + offset_ms - boot_s * 1000.0  # rtc = base + mono_ms at t=T0
        self.reset_at = reset_at
        self._t = float(T0)
        self._sleepers: list[asyncio.Future[None]] = []

    @property
    def t(self) -> float:
        return self._t

    @t.setter
    def t(self, value: float) -> None:
        self._t = value
        if self._sleepers:  # they check their own deadline again
            sleepers, self._sleepers = self._sleepers, []
            for f in sleepers:
                if not f.done():
                    f.set_result(None)

    def mono_at(self, t: float) -> float:
        return self.boot_s + (t - T0) / 1000.0 * self.k

    def rtc_at(self, t: float) -> int:
        if self.reset_at is not None and t >= self.reset_at:
            return int(EPOCH_1970 + (self.mono_at(t) - self.mono_at(self.reset_at)) * 1000.0)
        return int(self.base + self.mono_at(t) * 1000.0)

    def monotonic(self) -> float:
        return self.mono_at(self._t)

    def time_ms(self) -> int:
        return self.rtc_at(self._t)

    async def sleep(self, seconds: float) -> None:
        await self.sleep_until(self.monotonic() + max(0.0, seconds))

    async def sleep_until(self, deadline: float) -> None:
        while self.monotonic() < deadline:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._sleepers.append(fut)
            await fut


@dataclass
class Params:
    devices: int = 20
    sensors: int = 8
    period_s: float = 60.0
    hours: float = 24.0
    batch_s: float = 300.0
    resend_share: float = 0.20
    qos1_share: float = 0.02
    restarts_per_day: float = 2.0
    crash_share: float = 0.5
    gateway_share: float = 0.10
    offset_max_s: float = 600.0
    drift_max_ppm: float = 200.0
    rtc_reset_share: float = 0.01
    ingest_restarts: int = 4
    sync_burst: int = 3
    warmup_ping_s: float = 60.0
    gateway_tolerance_ms: int = 2000
    window_s: float = 600.0
    max_entries: int = 4096
    seed: int = 1
    parallel: int = 8  # devices simulated at once
    codec: str = "columnar-zstd"  # the buffer's chunk codec (the pure-Python tsz is slow)
    workdir: str = ""  # buffer and store files (default: a fresh temporary directory)


STAGES = ("edge_window", "validation_rejected", "seq_idempotency", "gateway_dropped",
          "gateway_replaced")


@dataclass
class Sim:
    p: Params
    rng: random.Random
    truth: dict[tuple[str, str, int], tuple[int, int]] = field(default_factory=dict)
    copies: list[int] = field(default_factory=list)  # per event
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        (*STAGES, "transmissions", "retransmitted_chunks", "retransmitted_readings",
         "samples", "agent_restarts", "agent_crashes", "ingest_restarts",
         "qos1_redeliveries", "restart_redeliveries", "gateway_copies",
         "dedup_fingerprints_restored", "source_acks"), 0))
    edge_bytes_per_entry: float = 0.0


def _delays(rng: random.Random) -> tuple[float, float, float]:
    up = 20 + rng.expovariate(1 / 80)
    down = 20 + rng.expovariate(1 / 30)
    if rng.random() < 0.05:
        if rng.random() < 0.5:
            up += rng.uniform(500, 3000)
        else:
            down += rng.uniform(500, 3000)
    return up, rng.uniform(1, 10), down


def build_inputs(sim: Sim, clocks: list[DeviceClock]) -> list[list[tuple[float, Reading]]]:
    """Per device: (arrival true ms, reading as the source delivers it), sorted."""
    p, rng = sim.p, sim.rng
    end = T0 + p.hours * 3_600_000
    inputs: list[list[tuple[float, Reading]]] = [[] for _ in range(p.devices)]
    period = p.period_s * 1000
    for d in range(p.devices):
        for j in range(p.sensors):
            sensor = f"d{d}s{j}"
            other = rng.randrange(p.devices - 1) if rng.random() < p.gateway_share else -1
            if other >= d:
                other += 1
            phase = rng.uniform(0, 2 * math.pi)
            t = T0 + rng.uniform(0, period)
            while t < end:
                eid = len(sim.copies)
                value = round(20 + 5 * math.sin(phase + (t - T0) / 13_751_000)
                              + rng.gauss(0, 0.3), 1)
                receivers = [(d, 0.0)] + ([(other, rng.uniform(0, 20))] if other >= 0 else [])
                sim.copies.append(0)
                for g, jitter in receivers:
                    dev = f"gw{g:04d}"
                    raw = clocks[g].rtc_at(t + jitter)
                    key = (dev, sensor, raw)
                    assert key not in sim.truth, "ground-truth key collision"
                    sim.truth[key] = (eid, round(t))
                    r = Reading(dev, sensor, raw, value)
                    inputs[g].append((t + jitter, r))
                    if g != d:
                        sim.counters["gateway_copies"] += 1
                    if rng.random() < p.qos1_share:
                        inputs[g].append((t + jitter + rng.uniform(100, 30_000), r))
                        sim.counters["qos1_redeliveries"] += 1
                t += period
    for lst in inputs:
        lst.sort(key=lambda x: x[0])
    return inputs


class _Agent:
    """One agent process of a device: the product's ingest stage over a real buffer."""

    def __init__(self, sim: Sim, d: int, clock: DeviceClock, path: Path) -> None:
        p = sim.p
        self.buffer = DurableBuffer(
            BufferConfig(path=str(path), codec=p.codec, commit_window_ms=0,
                         chunk_max_age_s=3600.0, budget_bytes=1 << 30),
            clock=clock, new_instance=lambda: f"{p.seed:08x}{d:08x}")
        self.dedup = Deduplicator(DedupConfig(window_s=p.window_s, max_entries=p.max_entries),
                                  clock=clock)
        self.timesync = TimeCorrector(TimeSyncConfig(), clock=clock)
        self.validator = Validator(ValidationConfig(), now_ms=self.timesync.now_ms)
        self.stage = IngestStage(asyncio.Queue(), buffer=self.buffer, clock=clock,
                                 validator=self.validator, dedup=self.dedup,
                                 timesync=self.timesync,
                                 aggregator=Aggregator(AggregationConfig(), clock=clock),
                                 priorities=PriorityMap([]))

    async def start(self) -> None:
        await self.buffer.open()
        await self.stage.restore()

    async def crash(self) -> None:
        """``kill -9``: the buffer's tasks stop and its connection goes, nothing flushed;
        on disk stays what was committed (staging included)."""
        buf: Any = self.buffer
        for t in buf._tasks:
            t.cancel()
        await asyncio.gather(*buf._tasks, return_exceptions=True)
        buf._tasks = []
        db, buf._db = buf._db, None
        await db.close()

    async def stop(self) -> None:
        await self.buffer.close()

    def settle(self, c: dict[str, int]) -> None:
        c["edge_window"] += self.stage.counts["duplicates_dropped"]
        c["validation_rejected"] += sum(self.validator.rejected.values())
        c["dedup_fingerprints_restored"] += int(self.dedup.stats()["restored"])


async def run_device(sim: Sim, d: int, clock: DeviceClock,
                     arrivals: list[tuple[float, Reading]],
                     uploads: list[tuple[float, int, bytes]], workdir: Path) -> None:
    """One gateway over the run; appends (cloud arrival ms, device, envelope) to uploads.

    Its own random stream, so devices can run concurrently and the run stays seeded."""
    p, c = sim.p, sim.counters
    rng = random.Random(p.seed * 1_000_003 + d)
    dev = f"gw{d:04d}"
    path = workdir / f"{dev}.db"
    end = T0 + p.hours * 3_600_000
    batch_ms = p.batch_s * 1000
    restarts = sorted(T0 + rng.uniform(0, end - T0)
                      for _ in range(_poisson(rng, p.restarts_per_day * p.hours / 24)))
    idx = 0
    extra: list[tuple[float, Reading]] = []
    last_batch: list[Reading] = []  # the source batch committed last
    sent: dict[tuple[str, int, int], list[int]] = {}  # chunk -> events, until deleted
    delete_later: list[tuple[int, tuple[str, int, int]]] = []  # acked, delete not committed
    lost: list[int] = []  # sent, ack lost: back to the buffer at the end of the cycle
    batch_no = 0

    clock.t = T0 - 60_000
    agent = _Agent(sim, d, clock, path)
    await agent.start()

    async def source_ack() -> None:
        c["source_acks"] += 1

    async def ingest(upto: float) -> None:
        nonlocal idx, extra, last_batch
        chunk = [x for x in extra if x[0] <= upto]
        extra = [x for x in extra if x[0] > upto]
        while idx < len(arrivals) and arrivals[idx][0] <= upto:
            chunk.append(arrivals[idx])
            idx += 1
        chunk.sort(key=lambda x: x[0])
        for _, r in chunk:
            sim.copies[sim.truth[_tkey(r)][0]] += 1
        clock.t = upto
        last_batch = [r for _, r in chunk]
        if last_batch:  # one source batch, acknowledged once committed (QoS 1)
            await agent.stage.process(SourceBatch(last_batch, ack=source_ack))

    def exchange(t_send: float, *, ack_lost: bool = False) -> tuple[float, float]:
        """One transmission; returns (cloud arrival, local time the agent goes on)."""
        up, proc, down = _delays(rng)
        if ack_lost:
            return t_send + up, t_send + 200
        clock.t = t_send
        t1 = clock.time_ms()
        t2 = round(t_send + up)
        t3 = round(t2 + proc)
        clock.t = t3 + down
        c["samples"] += agent.timesync.add_sample(t1, t2, t3, clock.time_ms())
        return t_send + up, clock.t

    def sync_burst(t_start: float) -> None:
        """Sync pings when the agent starts (like NTP iburst): one ack is not enough."""
        now = t_start
        for _ in range(p.sync_burst):
            _, now = exchange(now)
            now += 500

    async def delete_acked() -> None:
        nonlocal delete_later
        if delete_later:
            await agent.buffer.ack([i for i, _ in delete_later])
            for _, key in delete_later:
                del sent[key]
            delete_later = []

    async def upload(t: float) -> float:
        """Send everything sealed; returns the local time the agent goes on."""
        nonlocal batch_no, delete_later
        buf = agent.buffer
        await delete_acked()
        await buf.flush()
        now = t
        while got := await buf.take(1 << 20, max_chunks=64):
            for sc in got:
                ch = sc.chunk
                key = (buf.instance, ch.seq_first, ch.seq_last)
                if key in sent:
                    c["retransmitted_chunks"] += 1
                    c["retransmitted_readings"] += ch.count
                    for e in sent[key]:
                        sim.copies[e] += 1
                else:
                    sent[key] = [sim.truth[_tkey(r)][0] for r in open_chunk(ch)]
            batch_no += 1
            inst, base, hwm = buf.stream_of(dev)
            payload = encode_batch(Batch(dev, f"{dev}-{inst}-{batch_no}",
                                         [sc.chunk for sc in got], clock.time_ms(), inst,
                                         base, hwm))
            c["transmissions"] += 1
            ack_lost = rng.random() < p.resend_share
            arrival, now = exchange(now, ack_lost=ack_lost)
            uploads.append((arrival, d, payload))
            if ack_lost:
                lost.extend(sc.id for sc in got)  # sent again next cycle
            else:
                await delete_acked()
                delete_later = [(sc.id, (buf.instance, sc.chunk.seq_first, sc.chunk.seq_last))
                                for sc in got]
        if lost:
            await buf.release(lost)
            lost.clear()
        return now

    sync_burst(T0 - 60_000)
    t = T0 + rng.uniform(0, batch_ms)
    ri = 0
    pending = True
    while t < end or idx < len(arrivals) or extra or pending:
        if ri < len(restarts) and restarts[ri] <= t:
            tr = min(max(restarts[ri], clock.t + 1000), t - 10_000)
            ri += 1
            if tr < clock.t + 1000:
                continue  # too close to the previous action: skip this restart
            c["agent_restarts"] += 1
            await ingest(tr)  # accepted (committed) before the stop
            if rng.random() < p.crash_share:
                c["agent_crashes"] += 1
                # the worst moment: the batch just committed, its ack never reached the
                # broker, which delivers all of it again to the next process
                extra.extend((tr + 5000, r) for r in last_batch)
                c["restart_redeliveries"] += len(last_batch)
                await agent.crash()  # the delete of the last acked batch never committed
                delete_later = []
            else:
                await delete_acked()
                await agent.stop()
            agent.settle(c)
            clock.t = tr + 3000
            agent = _Agent(sim, d, clock, path)
            await agent.start()
            sync_burst(tr + 5000)
            continue
        await ingest(t)
        now = await upload(t)
        pending = agent.buffer.stats().chunks_pending > 0
        ping = now + p.warmup_ping_s * 1000
        while agent.timesync.wants_samples() and ping < t + batch_ms - 15_000:
            _, now = exchange(ping)  # warm-up pings until the drift is known
            ping = now + p.warmup_ping_s * 1000
        t += batch_ms
    await delete_acked()
    await agent.stop()
    agent.settle(c)
    sim.edge_bytes_per_entry = float(agent.dedup.stats()["bytes_per_entry"])


def _tkey(r: Reading) -> tuple[str, str, int]:
    return (r.device_id, r.sensor, r.ts_ms if r.raw_ts_ms is None else r.raw_ts_ms)


def _poisson(rng: random.Random, lam: float) -> int:
    k, prod, limit = 0, rng.random(), math.exp(-lam)
    while prod > limit:
        k += 1
        prod *= rng.random()
    return k


async def run_cloud(sim: Sim, uploads: list[tuple[float, int, bytes]], path: Path
                    ) -> tuple[list[Reading], dict[str, Any]]:
    """Every upload through the real ingest into a real SQLite store, in arrival order;
    returns every stored row and the store's completeness ledger and ack statuses."""
    p, rng, c = sim.p, sim.rng, sim.counters
    uploads.sort(key=lambda u: (u[0], u[1]))  # a device's own uploads keep their order
    t_first, t_last = uploads[0][0], uploads[-1][0]
    restarts = sorted(rng.uniform(t_first, t_last) for _ in range(p.ingest_restarts))
    statuses: collections.Counter[str] = collections.Counter()

    async def start() -> tuple[SqliteStore, IngestService]:
        store = SqliteStore(path)
        await store.open()
        gw = GatewayDeduper(p.gateway_tolerance_ms, ConflictPolicy.BEST_QUALITY,
                            horizon_ms=3 * 3600 * 1000) if p.gateway_tolerance_ms else None
        return store, IngestService(store, gateway=gw)

    def settle(svc: IngestService) -> None:
        c["gateway_dropped"] += svc.counters["gateway_dropped"]
        c["gateway_replaced"] += svc.counters["gateway_replaced"]

    store, svc = await start()
    ri = 0
    try:
        for arrival, d, payload in uploads:
            while ri < len(restarts) and restarts[ri] <= arrival:
                ri += 1
                c["ingest_restarts"] += 1
                settle(svc)
                await store.close()
                store, svc = await start()
            ack = await svc.handle(Incoming(payload, "bench", channel_device_id=f"gw{d:04d}",
                                            peer="bench"))
            statuses[ack.status] += 1
            c["seq_idempotency"] += ack.duplicates
        settle(svc)
        rows: list[Reading] = []
        for d in range(p.devices):
            rows.extend(await store.query(f"gw{d:04d}"))
        ledger = await store.completeness()
    finally:
        await store.close()
    totals = {"streams": len(ledger), "stored": sum(s.stored for s in ledger),
              "unexplained": sum(s.unexplained for s in ledger),
              "duplicates": sum(s.duplicates for s in ledger),
              "conflicts": sum(s.conflicts for s in ledger),
              "gaps": dict(sum((collections.Counter(s.gaps) for s in ledger),
                               collections.Counter()))}
    return rows, {"acks": dict(statuses), "completeness": totals}


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return float(s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))])


def evaluate(sim: Sim, rows: list[Reading]) -> dict[str, Any]:
    stored = [0] * len(sim.copies)
    by_event: dict[int, list[str]] = {}
    err_sync: list[float] = []
    err_all: list[float] = []
    covered = anchored = uncertain = 0
    for r in rows:
        eid, true_t = sim.truth[_tkey(r)]
        stored[eid] += 1
        by_event.setdefault(eid, []).append(r.device_id)
        e = abs(r.ts_ms - true_t)
        err_all.append(e)
        if r.quality & Quality.TIME_CORRECTED:
            err_sync.append(e)
            covered += e <= r.uncert_ms
        anchored += bool(r.quality & Quality.TIME_ANCHORED)
        uncertain += bool(r.quality & Quality.TIME_UNCERTAIN)
    same_gw = cross_gw = 0
    for devs in by_event.values():
        if len(devs) > 1:
            n_dev = len(set(devs))
            same_gw += len(devs) - n_dev  # one gateway's reading under two seqs
            cross_gw += n_dev - 1  # two gateways' copies of one event both kept
    tp = removed = redundant = false_drops = dup_stored = 0
    for cnt, s in zip(sim.copies, stored):
        rem = cnt - s
        removed += rem
        redundant += cnt - 1
        tp += min(rem, cnt - 1)
        false_drops += s == 0
        dup_stored += max(0, s - 1)
    c = sim.counters
    stage_total = sum(c[k] for k in STAGES)
    assert stage_total == removed, ("per-stage removals do not add up", stage_total, removed)
    assert same_gw + cross_gw == dup_stored
    return {
        "precision": round(tp / removed, 6) if removed else 1.0,
        "recall": round(tp / redundant, 6) if redundant else 1.0,
        "false_drops": false_drops,
        "duplicates_stored": dup_stored,
        "duplicates_stored_same_gateway": same_gw,
        "duplicates_stored_cross_gateway": cross_gw,
        "events": len(sim.copies),
        "copies": sum(sim.copies),
        "redundant_copies": redundant,
        "stored_rows": len(rows),
        "removed_by": {k: c[k] for k in STAGES},
        "time_error_ms_p50": _pct(err_sync, 0.50),
        "time_error_ms_p99": _pct(err_sync, 0.99),
        "time_error_ms_max": _pct(err_sync, 1.0),
        "time_error_ms_p99_all_stored": _pct(err_all, 0.99),
        "corrected_share": round(len(err_sync) / len(err_all), 6) if err_all else 0.0,
        "uncert_covers_error_share": round(covered / len(err_sync), 6) if err_sync else None,
        "anchored_readings": anchored,
        "uncertain_readings": uncertain,
        "edge_window_bytes_per_entry": sim.edge_bytes_per_entry,
    }


def parse(argv: list[str]) -> Params:
    ap = argparse.ArgumentParser(prog="python -m bench dedup", description=__doc__.split("\n")[0])
    for f in Params.__dataclass_fields__.values():
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    return Params(**vars(ap.parse_args(argv)))


async def run(p: Params, workdir: Path) -> tuple[Sim, dict[str, Any]]:
    rng = random.Random(p.seed)
    sim = Sim(p, rng)
    n_reset = max(1, round(p.rtc_reset_share * p.devices)) if p.rtc_reset_share > 0 else 0
    reset_devs = set(rng.sample(range(p.devices), n_reset))
    span = p.hours * 3_600_000
    clocks = [DeviceClock(rng.uniform(-1, 1) * p.offset_max_s * 1000,
                          rng.uniform(-1, 1) * p.drift_max_ppm, rng.uniform(100, 1e6),
                          T0 + rng.uniform(0.2, 0.8) * span if d in reset_devs else None)
              for d in range(p.devices)]
    inputs = build_inputs(sim, clocks)
    uploads: list[tuple[float, int, bytes]] = []
    slots = asyncio.Semaphore(max(1, p.parallel))

    async def device(d: int) -> None:
        async with slots:  # devices only wait on their SQLite threads: overlap them
            await run_device(sim, d, clocks[d], inputs[d], uploads, workdir)
            inputs[d] = []

    await asyncio.gather(*(device(d) for d in range(p.devices)))
    rows, cloud = await run_cloud(sim, uploads, workdir / "cloud.db")
    results = evaluate(sim, rows)
    results.update(cloud)
    results["rtc_reset_devices"] = n_reset
    return sim, results


@contextlib.contextmanager
def _logs_to_stderr() -> Iterator[None]:
    """The product's warnings go to stderr while the benchmark runs (stdout is the JSON);
    a configuration someone else made is put back afterwards."""
    was, old = structlog.is_configured(), structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
                        logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    try:
        yield
    finally:
        if was:
            structlog.configure(**old)
        else:
            structlog.reset_defaults()


def main(argv: list[str]) -> int:
    p = parse(argv)
    started = time.perf_counter()
    if p.workdir:
        workdir = Path(p.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        cleanup = None
    else:
        shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) \
            else None
        cleanup = workdir = Path(tempfile.mkdtemp(prefix="bench-dedup-", dir=shm))
    try:
        with _logs_to_stderr():
            sim, results = asyncio.run(run(p, workdir))
    finally:
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
    results["counters"] = sim.counters
    results["wall_s"] = round(time.perf_counter() - started, 2)
    params = dict(vars(p))
    params["workdir"] = p.workdir or "temporary (/dev/shm when present)"
    params["rtc_reset_devices"] = results.pop("rtc_reset_devices")
    params["edge_dedup"] = "ring+open-addressing xxh3_64, exact fingerprints, persisted"
    params["path"] = ("IngestStage + DurableBuffer (SQLite) -> envelope -> IngestService "
                      "-> SqliteStore")
    emit("dedup", params, results)
    return 0
