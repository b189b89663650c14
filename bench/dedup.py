"""Dedup + time reconciliation benchmark: ``python -m bench dedup [--devices N]
[--sensors S] [--period-s P] [--hours H] [--seed K] ...``.

A seeded simulation with ground truth. Each device (a gateway running the agent) has its
own RTC and monotonic clock (one crystal: offset up to +-``offset_max_s``, drift up to
+-``drift_max_ppm``); ``rtc_reset_share`` of devices (at least one) see the RTC jump to
1970 mid-day while the agent keeps running. Each device samples ``sensors`` sensors
every ``period_s`` (random phase); ``gateway_share`` of all sensors are also heard by a
second, random gateway (+0..20 ms radio jitter, stamped by that gateway's RTC).

Duplicates come from: QoS 1 redeliveries (``qos1_share`` of source messages delivered
again 0.1..30 s later); lost acks (``resend_share`` of transmissions: the batch is sent
again next cycle, same seqs); agent restarts (``restarts_per_day`` per device, Poisson:
the edge window and the clock model are lost, the last acked batch is sent again because
its delete never happened, and the messages of the last 2 s are redelivered by the
source with *new* seqs); and the second gateway.

Per device: source -> :class:`agent.dedup.Deduplicator` -> :class:`agent.timesync.
TimeCorrector` -> seq -> batches every ``batch_s``; each acked transmission gives one
NTP sample with random asymmetric delays (up 20 ms + exp(80 ms), down 20 ms + exp(30 ms),
5% spikes of +0.5..3 s one way); at start and after a restart a burst of
``sync_burst`` pings, then a ping every ``warmup_ping_s`` while the corrector
``wants_samples()`` (drift not yet estimated). Cloud, all batches in
arrival order: :class:`cloud.dedup.IdempotencyState` per device (persisted with
``to_bytes`` and reloaded at ``ingest_restarts`` simulated ingest restarts), the store's
natural-key upsert (:func:`cloud.dedup.natural_key`), then :class:`cloud.dedup.
GatewayDeduper` (``best_quality``, rebuilt from the store's recent rows on restart).

Every copy of an event that enters the pipeline (each source delivery, each gateway
reception, each re-transmission) counts; ``removed = copies - stored`` per event.
``precision`` = correct removals / removals, ``recall`` = correct removals / redundant
copies, ``false_drops`` = events stored zero times, ``duplicates_stored`` = stored copies
beyond one. Time error = stored ts - true event time.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from agent.dedup import DedupConfig, Deduplicator
from agent.timesync import TimeCorrector, TimeSyncConfig
from bench.common import emit
from cloud.dedup import ConflictPolicy, GatewayDeduper, IdempotencyState, natural_key
from pymigrate.types import Quality, Reading

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
EPOCH_1970 = 5_000


class DeviceClock:
    """A device's RTC and monotonic clock as functions of true time ``t`` (ms).

    Both run ``1 + drift`` fast; an optional RTC reset at ``reset_at`` restarts the RTC
    near the epoch while monotonic time goes on. Implements the Clock reading methods.
    """

    def __init__(self, offset_ms: float, drift_ppm: float, boot_s: float,
                 reset_at: float | None) -> None:
        self.k = 1.0 + drift_ppm * 1e-6
        self.boot_s = boot_s
        self.base = T0 + offset_ms - boot_s * 1000.0  # rtc = base + mono_ms at t=T0
        self.reset_at = reset_at
        self.t = float(T0)

    def mono_at(self, t: float) -> float:
        return self.boot_s + (t - T0) / 1000.0 * self.k

    def rtc_at(self, t: float) -> int:
        if self.reset_at is not None and t >= self.reset_at:
            return int(EPOCH_1970 + (self.mono_at(t) - self.mono_at(self.reset_at)) * 1000.0)
        return int(self.base + self.mono_at(t) * 1000.0)

    def monotonic(self) -> float:
        return self.mono_at(self.t)

    def time_ms(self) -> int:
        return self.rtc_at(self.t)

    async def sleep(self, seconds: float) -> None:  # pragma: no cover - protocol only
        raise NotImplementedError

    async def sleep_until(self, deadline: float) -> None:  # pragma: no cover
        raise NotImplementedError


@dataclass
class Params:
    devices: int = 100
    sensors: int = 8
    period_s: float = 60.0
    hours: float = 24.0
    batch_s: float = 300.0
    resend_share: float = 0.20
    qos1_share: float = 0.02
    restarts_per_day: float = 2.0
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


@dataclass
class Sim:
    p: Params
    rng: random.Random
    truth: dict[tuple[str, str, int], tuple[int, int]] = field(default_factory=dict)
    copies: list[int] = field(default_factory=list)  # per event
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("edge_window", "seq_idempotency", "natural_key", "gateway_dropped",
         "gateway_replaced", "transmissions", "retransmissions", "samples",
         "agent_restarts", "ingest_restarts", "qos1_redeliveries",
         "restart_redeliveries", "gateway_copies"), 0))
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


def run_device(sim: Sim, d: int, clock: DeviceClock, arrivals: list[tuple[float, Reading]],
               uploads: list[tuple[float, int, list[Reading]]]) -> None:
    """One agent over the day; appends (cloud arrival ms, device, readings) to uploads."""
    p, rng, c = sim.p, sim.rng, sim.counters
    dcfg = DedupConfig(window_s=p.window_s, max_entries=p.max_entries)
    tcfg = TimeSyncConfig()
    dedup = Deduplicator(dcfg, clock=clock)
    tc = TimeCorrector(tcfg, clock=clock)
    end = T0 + p.hours * 3_600_000
    batch_ms = p.batch_s * 1000
    restarts = sorted(T0 + rng.uniform(0, end - T0)
                      for _ in range(_poisson(rng, p.restarts_per_day * p.hours / 24)))
    seq = 0
    accepted: list[Reading] = []  # in the durable buffer, not yet in a batch
    unacked: list[_Batch] = []
    last_acked: _Batch | None = None
    idx = 0
    extra: list[tuple[float, Reading]] = []

    clock.t = T0 - 60_000

    def ingest(upto: float) -> None:
        nonlocal idx, seq, extra
        chunk = [x for x in extra if x[0] <= upto]
        extra = [x for x in extra if x[0] > upto]
        while idx < len(arrivals) and arrivals[idx][0] <= upto:
            chunk.append(arrivals[idx])
            idx += 1
        chunk.sort(key=lambda x: x[0])
        for _, r in chunk:
            sim.copies[sim.truth[_tkey(r)][0]] += 1
        clock.t = upto
        kept = dedup.filter([r for _, r in chunk])
        c["edge_window"] += len(chunk) - len(kept)
        for r in tc.correct(kept):
            seq += 1
            accepted.append(msgspec.structs.replace(r, seq=seq))

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
        c["samples"] += tc.add_sample(t1, t2, t3, clock.time_ms())
        return t_send + up, clock.t

    def sync_burst(t_start: float) -> None:
        """Sync pings when the agent starts (like NTP iburst): one ack is not enough."""
        now = t_start
        for _ in range(p.sync_burst):
            _, now = exchange(now)
            now += 500

    sync_burst(T0 - 60_000)
    t = T0 + rng.uniform(0, batch_ms)
    ri = 0
    while t < end or unacked or accepted or idx < len(arrivals) or extra:
        if ri < len(restarts) and restarts[ri] <= t:
            tr = min(max(restarts[ri], clock.t + 1000), t - 10_000)
            ri += 1
            if tr < clock.t + 1000:
                continue  # too close to the previous action: skip this restart
            c["agent_restarts"] += 1
            ingest(tr)  # accepted (committed) before the crash
            for ta, r in arrivals[:idx]:
                if tr - 2000 < ta <= tr:  # accepted, but never acked to the source
                    extra.append((tr + 5000, r))
                    c["restart_redeliveries"] += 1
            if last_acked is not None:  # acked by the cloud, delete never committed
                unacked.insert(0, last_acked)
                last_acked = None
            dedup = Deduplicator(dcfg, clock=clock)
            tc = TimeCorrector(tcfg, clock=clock)
            sync_burst(tr + 5000)
            continue
        ingest(t)
        if accepted:
            unacked.append(_Batch(accepted))
            accepted = []
        now = t
        keep: list[_Batch] = []
        for batch in unacked:
            c["transmissions"] += 1
            if batch.sent:
                c["retransmissions"] += 1
                for r in batch.readings:
                    sim.copies[sim.truth[_tkey(r)][0]] += 1
            batch.sent = True
            lost = rng.random() < p.resend_share
            arrival, now = exchange(now, ack_lost=lost)
            uploads.append((arrival, d, batch.readings))
            if lost:
                keep.append(batch)  # sent again next cycle
            else:
                last_acked = batch
        unacked = keep
        ping = now + p.warmup_ping_s * 1000
        while tc.wants_samples() and ping < t + batch_ms - 15_000:
            _, now = exchange(ping)  # warm-up pings until the drift is known
            ping = now + p.warmup_ping_s * 1000
        t += batch_ms
    sim.edge_bytes_per_entry = float(dedup.stats()["bytes_per_entry"])


class _Batch:
    __slots__ = ("readings", "sent")

    def __init__(self, readings: list[Reading]) -> None:
        self.readings = readings
        self.sent = False


def _tkey(r: Reading) -> tuple[str, str, int]:
    return (r.device_id, r.sensor, r.ts_ms if r.raw_ts_ms is None else r.raw_ts_ms)


def _poisson(rng: random.Random, lam: float) -> int:
    k, prod, limit = 0, rng.random(), math.exp(-lam)
    while prod > limit:
        k += 1
        prod *= rng.random()
    return k


def run_cloud(sim: Sim, uploads: list[tuple[float, int, list[Reading]]]
              ) -> dict[tuple[str, str, int, bytes], Reading]:
    p, rng, c = sim.p, sim.rng, sim.counters
    uploads.sort(key=lambda u: u[0])
    t_first, t_last = uploads[0][0], uploads[-1][0]
    restarts = sorted(rng.uniform(t_first, t_last) for _ in range(p.ingest_restarts))
    states: dict[str, IdempotencyState] = {}
    persisted: dict[str, bytes] = {}
    store: dict[tuple[str, str, int, bytes], Reading] = {}

    def new_gw() -> GatewayDeduper:
        return GatewayDeduper(p.gateway_tolerance_ms, ConflictPolicy.BEST_QUALITY,
                              horizon_ms=3 * 3600 * 1000)

    gw = new_gw()
    ri = 0
    for arrival, _, batch in uploads:
        while ri < len(restarts) and restarts[ri] <= arrival:
            ri += 1
            c["ingest_restarts"] += 1
            states = {k: IdempotencyState.from_bytes(v) for k, v in persisted.items()}
            gw = new_gw()  # rebuilt from the store's recent rows
            horizon = T0 + (arrival - T0) - 3 * 3600 * 1000
            gw.offer(sorted((r for r in store.values() if r.ts_ms >= horizon),
                            key=lambda r: r.ts_ms))
        dev = batch[0].device_id
        st = states.setdefault(dev, IdempotencyState())
        fresh = [r for r in batch if not st.contains(r.seq)]
        c["seq_idempotency"] += len(batch) - len(fresh)
        new: list[Reading] = []
        keys: set[tuple[str, str, int, bytes]] = set()
        for r in fresh:  # the store's upsert, within the batch's transaction too
            k = natural_key(r)
            if k in store or k in keys:
                c["natural_key"] += 1
            else:
                keys.add(k)
                new.append(r)
        res = gw.offer(new)
        for r in res.store:
            store[natural_key(r)] = r
        for old, r in res.replaced:
            del store[natural_key(old)]
            store[natural_key(r)] = r
        c["gateway_dropped"] += len(res.dropped)
        c["gateway_replaced"] += len(res.replaced)
        st.add_range(batch[0].seq, batch[-1].seq)  # committed with the rows
        persisted[dev] = st.to_bytes()
    sim.counters["state_bytes_max"] = max(len(b) for b in persisted.values())
    return store


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return float(s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))])


def evaluate(sim: Sim, store: dict[tuple[str, str, int, bytes], Reading]) -> dict[str, Any]:
    stored = [0] * len(sim.copies)
    err_sync: list[float] = []
    err_all: list[float] = []
    covered = anchored = uncertain = 0
    for r in store.values():
        eid, true_t = sim.truth[_tkey(r)]
        stored[eid] += 1
        e = abs(r.ts_ms - true_t)
        err_all.append(e)
        if r.quality & Quality.TIME_CORRECTED:
            err_sync.append(e)
            covered += e <= r.uncert_ms
        anchored += bool(r.quality & Quality.TIME_ANCHORED)
        uncertain += bool(r.quality & Quality.TIME_UNCERTAIN)
    tp = removed = redundant = false_drops = dup_stored = 0
    for cnt, s in zip(sim.copies, stored):
        rem = cnt - s
        removed += rem
        redundant += cnt - 1
        tp += min(rem, cnt - 1)
        false_drops += s == 0
        dup_stored += max(0, s - 1)
    c = sim.counters
    stage_total = (c["edge_window"] + c["seq_idempotency"] + c["natural_key"]
                   + c["gateway_dropped"] + c["gateway_replaced"])
    assert stage_total == removed, (stage_total, removed)
    return {
        "precision": round(tp / removed, 6) if removed else 1.0,
        "recall": round(tp / redundant, 6) if redundant else 1.0,
        "false_drops": false_drops,
        "duplicates_stored": dup_stored,
        "events": len(sim.copies),
        "copies": sum(sim.copies),
        "redundant_copies": redundant,
        "removed_by": {k: c[k] for k in ("edge_window", "seq_idempotency", "natural_key",
                                         "gateway_dropped", "gateway_replaced")},
        "time_error_ms_p50": _pct(err_sync, 0.50),
        "time_error_ms_p99": _pct(err_sync, 0.99),
        "time_error_ms_max": _pct(err_sync, 1.0),
        "time_error_ms_p99_all_stored": _pct(err_all, 0.99),
        "corrected_share": round(len(err_sync) / len(err_all), 6),
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


def main(argv: list[str]) -> int:
    p = parse(argv)
    rng = random.Random(p.seed)
    sim = Sim(p, rng)
    n_reset = max(1, round(p.rtc_reset_share * p.devices)) if p.rtc_reset_share > 0 else 0
    reset_devs = set(rng.sample(range(p.devices), n_reset))
    span = p.hours * 3_600_000
    clocks = [DeviceClock(rng.uniform(-1, 1) * p.offset_max_s * 1000,
                          rng.uniform(-1, 1) * p.drift_max_ppm, rng.uniform(100, 1e6),
                          T0 + rng.uniform(0.2, 0.8) * span if d in reset_devs else None)
              for d in range(p.devices)]
    started = time.perf_counter()
    inputs = build_inputs(sim, clocks)
    uploads: list[tuple[float, int, list[Reading]]] = []
    for d in range(p.devices):
        run_device(sim, d, clocks[d], inputs[d], uploads)
    store = run_cloud(sim, uploads)
    results = evaluate(sim, store)
    results["counters"] = sim.counters
    results["wall_s"] = round(time.perf_counter() - started, 2)
    params = dict(vars(p))
    params["rtc_reset_devices"] = n_reset
    params["edge_dedup"] = "ring+open-addressing xxh3_64, exact fingerprints"
    emit("dedup", params, results)
    return 0

