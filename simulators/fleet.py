"""A fleet of simulated devices running the real agent against the real cloud ingest.

Each :class:`~simulators.device.SimDevice` runs the whole agent pipeline (sources,
ingest stage, durable SQLite buffer, uploader with its retry controller) in this process
on one shared virtual clock. Its uplink, :class:`CloudUplink`, carries each batch through
its group's :class:`~simulators.netmodel.NetModel` (latency, loss, bandwidth, outages) and
hands it to the real :class:`cloud.ingest.IngestService` writing a real
:class:`cloud.stores.SqliteStore` (idempotent, exactly-once), optionally behind a cloud
rate limit (:class:`TokenBucket`) and cloud outages.

:class:`Fleet` keeps the ground truth (what every generator produced, what the cloud
first received and when) and produces a :class:`~simulators.report.Report`.
"""

from __future__ import annotations

import asyncio
import collections
import math
import os
import random
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import msgspec
import structlog

from agent.config import parse_agent_config
from cloud.ingest import IngestService
from cloud.stores import SqliteStore
from pymigrate.clock import VirtualClock
from pymigrate.envelope import decode_batch
from pymigrate.errors import ThrottledError, TransportError
from pymigrate.types import Ack
from simulators.device import Battery, DeviceClock, SimDevice, StorageQuota
from simulators.driver import CpuMeter, TimeDriver
from simulators.netmodel import NetModel
from simulators.report import Report, build_report
from simulators.sensors import Generator
from transports.base import Incoming

__all__ = ["CloudSim", "CloudUplink", "DeviceSpec", "Fleet", "Group", "TokenBucket",
           "daily_outages"]

log = structlog.get_logger("pymigrate.sim")

START_MS = 1_767_229_200_000  # 2026-01-01T01:00:00Z: simulated wall time at t = 0
HOUR = 3600.0
_AGENT_FILES = [tracemalloc.Filter(True, f"*{os.sep}{pkg}{os.sep}*")
                for pkg in ("agent", "pymigrate", "transports")]


class TokenBucket:
    """Cloud API quota: ``rate`` batches per second, ``burst`` deep, on the sim clock.
    Raises :class:`ThrottledError` with the retry-after a real API would send."""

    def __init__(self, rate: float, burst: float, clock: VirtualClock) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.tokens = burst
        self._t = clock.monotonic()
        self.throttled = 0

    def check(self, device_id: str) -> None:
        now = self.clock.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self._t) * self.rate)
        self._t = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return
        self.throttled += 1
        raise ThrottledError(retry_after_s=max(1.0, math.ceil((1.0 - self.tokens) / self.rate)))


class CloudSim:
    """The real ingest service and store, plus outage windows and ground-truth records."""

    def __init__(self, root: Path, clock: VirtualClock, *, limiter: TokenBucket | None = None,
                 outages: Sequence[tuple[float, float]] = ()) -> None:
        self.clock = clock
        self.store = SqliteStore(root / "cloud.db")
        self.ingest = IngestService(self.store, clock=clock, limiter=limiter)
        self.limiter = limiter
        self.outages = sorted(outages)
        self.first_seen: set[tuple[str, int]] = set()
        self.lag_by_device: dict[str, list[tuple[float, int]]] = {}
        # (recv time s, lag s of the chunk midpoint, readings, priority) per first delivery
        self.deliveries: list[tuple[float, float, int, int]] = []
        self.requests: collections.Counter[int] = collections.Counter()  # per minute
        self.ok_batches = 0

    def down(self, t: float) -> bool:
        return any(a <= t < b for a, b in self.outages)

    async def handle(self, payload: bytes, device_id: str) -> Ack:
        now = self.clock.monotonic()
        self.requests[int(now // 60)] += 1
        ack = await self.ingest.handle(Incoming(payload, "sim", device_id))
        if ack.status == "ok":
            self.ok_batches += 1
            recv_ms = self.clock.true_time_ms()
            for c in decode_batch(payload).chunks:
                key = (c.device_id, c.seq_first)
                if key in self.first_seen:
                    continue
                self.first_seen.add(key)
                mid = (c.ts_first + c.ts_last) / 2
                lag = (recv_ms - mid) / 1000.0
                self.deliveries.append((now, lag, c.count, int(c.priority)))
                self.lag_by_device.setdefault(c.device_id, []).append((lag, c.count))
        return ack


class CloudUplink:
    """An ``Uplink`` through a network model to :class:`CloudSim`, on the sim clock."""

    end_to_end = True

    def __init__(self, model: NetModel, cloud: CloudSim, clock: DeviceClock, *,
                 device_id: str, max_payload: int = 256 * 1024, connect_fail_s: float = 0.5,
                 battery: Battery | None = None) -> None:
        self.name = "sim"
        self.model = model
        self.cloud = cloud
        self.clock = clock
        self.device_id = device_id
        self.max_payload = max_payload
        self.connect_fail_s = connect_fail_s
        self.battery = battery
        self.wire_bytes = 0
        self.attempts = 0
        self.wire_log: collections.Counter[int] = collections.Counter()  # bytes per minute

    async def connect(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _wire(self, n: int) -> None:
        now = self.clock.monotonic()
        self.wire_bytes += n
        self.wire_log[int(now // 60)] += n
        if self.battery is not None:
            self.battery.send(now, n)

    async def send(self, payload: bytes, *, batch_id: str,
                   timeout: float) -> Ack:  # noqa: ASYNC109 - part of the Uplink contract
        self.attempts += 1
        now = self.clock.monotonic()
        if self.model.down(now):
            self._wire(self.model.header)  # a SYN/CON into the void
            await self.clock.sleep(min(timeout, self.connect_fail_s))
            raise TransportError("unreachable (no link)")
        ex = self.model.exchange(len(payload))
        self._wire(ex.wire_bytes)
        if not ex.request_ok or ex.request_s >= timeout:
            await self.clock.sleep(timeout)
            raise TransportError("timeout")
        await self.clock.sleep(ex.request_s)
        if self.cloud.down(self.clock.monotonic()):
            self.cloud.requests[int(self.clock.monotonic() // 60)] += 1  # answered 503
            await self.clock.sleep(min(ex.response_s, max(0.0, timeout - ex.request_s)))
            raise TransportError("cloud unavailable (503)")
        ack = await self.cloud.handle(payload, self.device_id)
        if not ex.response_ok or ex.duration_s > timeout:
            await self.clock.sleep(max(0.0, timeout - ex.request_s))
            raise TransportError("timeout (ack lost)")
        await self.clock.sleep(ex.response_s)
        return ack


class Group(msgspec.Struct, frozen=True):
    """Devices sharing network conditions (a region, a site, a link type)."""

    name: str
    devices: int
    loss: float = 0.0
    latency_s: float = 0.05
    jitter_s: float = 0.02
    bandwidth_bps: float = 1_000_000.0
    link_retries: int = 2
    outages_h: tuple[tuple[float, float], ...] = ()  # link down (hours from start)
    config: dict[str, Any] = msgspec.field(default_factory=dict)  # agent config overrides


class DeviceSpec(msgspec.Struct, frozen=True):
    """How to build each device: agent config overrides and its generators."""

    config: dict[str, Any] = msgspec.field(default_factory=dict)
    quota_bytes: int | None = None
    battery: bool = False


GenFactory = Callable[[str, DeviceClock, int], list[Generator]]


def daily_outages(hours: float, open_from_h: float, open_to_h: float,
                  start_h: float = 1.0) -> tuple[tuple[float, float], ...]:
    """Link outages (hours from start) outside a daily window ``[open_from_h, open_to_h)``
    (UTC hours) for a run starting at UTC hour ``start_h`` and lasting ``hours`` (+48 h)."""
    length = (open_to_h - open_from_h) % 24 or 24.0
    first = (open_from_h - start_h) % 24 - 24  # a window opening before t = 0
    out: list[tuple[float, float]] = []
    t = first
    while t < hours + 48:
        nxt = t + 24
        out.append((max(0.0, t + length), nxt))
        t = nxt
    return tuple((a, b) for a, b in out if b > a)


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k),
                                                                         dict) else v
    return out


class Fleet:
    """Builds devices in groups, drives virtual time, samples a timeline, reports."""

    def __init__(self, *, name: str, groups: Sequence[Group], gens: GenFactory,
                 spec: DeviceSpec | None = None, seed: int = 1,
                 limiter: tuple[float, float] | None = None,
                 cloud_outages_h: Sequence[tuple[float, float]] = (),
                 root: Path | None = None, memory: bool = False,
                 sample_s: float = 300.0,
                 progress: Callable[[float], None] | None = None) -> None:
        self.name = name
        self.groups = list(groups)
        self.gens = gens
        self.spec = spec or DeviceSpec()
        self.seed = seed
        self.clock = VirtualClock(START_MS)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if root is None:
            # tmpfs when there is one: sizes are the same, fsyncs cost nothing
            shm = Path("/dev/shm")
            base = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
            self._tmp = tempfile.TemporaryDirectory(prefix="pymigrate-sim-", dir=base)
            root = Path(self._tmp.name)
        self.root = root
        bucket = TokenBucket(limiter[0], limiter[1], self.clock) if limiter else None
        self.cloud = CloudSim(root, self.clock, limiter=bucket,
                              outages=[(a * HOUR, b * HOUR) for a, b in cloud_outages_h])
        self.devices: list[SimDevice] = []
        self.uplinks: dict[str, CloudUplink] = {}
        self.memory = memory
        self.sample_s = sample_s
        self.progress = progress
        self.timeline: list[dict[str, float]] = []
        self.driver = TimeDriver(self.clock)
        self.cpu = CpuMeter()
        self.peak_mem = 0
        self.peak_agent_heap = 0  # per device: live blocks allocated by agent code
        self._snapshots = 0
        self.events: collections.Counter[str] = collections.Counter()
        self.wall_s = 0.0
        self.hooks: list[tuple[float, Callable[[Fleet], Coroutine[Any, Any, None]]]] = []
        self._next_sample = 0.0
        self._hook_tasks: list[asyncio.Task[None]] = []

    # ---------------------------------------------------------------- building
    def _build(self) -> None:
        rng = random.Random(self.seed)
        n = 0
        for g in self.groups:
            model_outages = [(a * HOUR, b * HOUR) for a, b in g.outages_h]
            for _ in range(g.devices):
                dev_id = f"{g.name}-{n:04d}"
                clock = DeviceClock(self.clock)
                data_dir = self.root / dev_id
                base = {"device": {"id": dev_id, "data_dir": str(data_dir)},
                        "retry": {"seed": self.seed * 100_003 + n},
                        "pipeline": {"drain_timeout_s": 5.0}}
                cfg = parse_agent_config(_merge(_merge(base, self.spec.config), g.config))
                battery = Battery() if self.spec.battery else None
                model = NetModel(loss=g.loss, latency_s=g.latency_s, jitter_s=g.jitter_s,
                                 bandwidth_bps=g.bandwidth_bps, link_retries=g.link_retries,
                                 outages=model_outages,
                                 rng=random.Random(rng.getrandbits(32)))
                up = CloudUplink(model, self.cloud, clock, device_id=dev_id, battery=battery)
                dev = SimDevice(cfg, clock=clock, generators=self.gens(dev_id, clock, n),
                                uplink=up, group=g.name,
                                quota=StorageQuota(self.spec.quota_bytes), battery=battery,
                                on_event=self._on_event)
                self.devices.append(dev)
                self.uplinks[dev_id] = up
                n += 1

    def _on_event(self, device: str, name: str, data: dict[str, Any]) -> None:
        self.events[name] += 1

    def at(self, hours: float, hook: Callable[[Fleet], Coroutine[Any, Any, None]]) -> None:
        """Run ``hook(fleet)`` once simulated time reaches ``hours`` (e.g. a restart)."""
        self.hooks.append((hours * HOUR, hook))
        self.hooks.sort(key=lambda h: h[0])

    # ---------------------------------------------------------------- running
    def backlog(self) -> tuple[int, int]:
        b = r = 0
        for d in self.devices:
            nb, nr = d.sample()
            b += nb
            r += nr
        return b, r

    def _sample(self, now: float) -> None:
        backlog_bytes, backlog_readings = self.backlog()
        delivered = sum(c for _, _, c, _ in self.cloud.deliveries)
        wire = sum(u.wire_bytes for u in self.uplinks.values())
        self.timeline.append({"t_h": now / HOUR, "backlog_bytes": backlog_bytes,
                              "backlog_readings": backlog_readings,
                              "delivered": delivered, "wire_bytes": wire})
        if self.memory:
            self.peak_mem = max(self.peak_mem, tracemalloc.get_traced_memory()[1])
            self._snapshots += 1
            if self._snapshots % 12 == 1:  # a snapshot is costly: every 12th sample
                snap = tracemalloc.take_snapshot().filter_traces(_AGENT_FILES)
                live = sum(st.size for st in snap.statistics("filename"))
                self.peak_agent_heap = max(self.peak_agent_heap, live // max(1, len(self.devices)))

    async def _on_step(self, now: float) -> None:
        for t in self._hook_tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
        while self.hooks and self.hooks[0][0] <= now:
            _, hook = self.hooks.pop(0)
            # a hook may wait on virtual time (a graceful stop drains): run it beside
            # the driver, never inside it
            self._hook_tasks.append(asyncio.create_task(hook(self), name="sim[hook]"))
        if now >= self._next_sample:
            self._sample(now)
            self._next_sample = now + self.sample_s
            if self.progress is not None:
                self.progress(now)

    async def drive(self, aw: Awaitable[Any], *, limit_h: float = 24.0) -> Any:
        """Await ``aw`` while the driver keeps virtual time moving (up to ``limit_h``)."""
        task = asyncio.ensure_future(aw)
        await self.driver.run_until(self.clock.monotonic() + limit_h * HOUR, None,
                                    until=task.done)
        if not task.done():
            task.cancel()
            raise TimeoutError(f"not done within {limit_h} simulated hours")
        return task.result()

    def _all_delivered(self) -> bool:
        """Sources finished and nothing left anywhere in any agent (queue, open windows,
        pending group commit, open or sealed chunks, batches in flight, gap records the
        cloud has not acked)."""
        for d in self.devices:
            if d.agent is None:
                continue
            if not all(g.finished for g in d.generators):
                return False
            ag = d.agent
            if not ag.queue.empty() or ag.buffer._pending:  # private: pending group commit
                return False
            if ag.ingest._has_rules and ag.aggregator.next_deadline_ms() is not None:
                return False
            st = ag.buffer.stats()
            if st.chunks_pending or st.in_flight or st.open_chunks or st.gaps_pending:
                return False
        return True

    async def run(self, hours: float, *, drain_hours: float = 48.0,
                  inspect: Callable[[Fleet], Awaitable[None]] | None = None) -> Report:
        """Produce for ``hours``, then stop the sources and deliver what is buffered
        (up to ``drain_hours`` more), stop every agent and build the report.
        ``inspect(fleet)`` runs at the end while the cloud store is still open."""
        t_wall = time.perf_counter()
        loop = asyncio.get_running_loop()
        if self.memory:
            tracemalloc.start()
        self.cpu.install(loop)
        self.driver.start()
        drained_at: float | None = None
        try:
            self._build()
            await self.cloud.store.open()
            for d in self.devices:
                await d.start()
            end = hours * HOUR
            await self.driver.run_until(end, self._on_step)
            if self._hook_tasks:  # let hooks still running finish (time keeps moving)
                await self.driver.run_until(
                    end + drain_hours * HOUR, self._on_step,
                    until=lambda: all(t.done() for t in self._hook_tasks))
                for t in self._hook_tasks:
                    t.result()
            for d in self.devices:
                d.stop_sources()
            for d in self.devices:
                if d.agent is not None:
                    await d.agent.buffer.flush()
            if await self.driver.run_until(end + drain_hours * HOUR, self._on_step,
                                           until=self._all_delivered):
                drained_at = self.clock.monotonic()
            self._sample(self.clock.monotonic())
            # a graceful stop waits on virtual time (group commit window, drain deadline)
            await self.drive(asyncio.gather(*(d.stop() for d in self.devices)))
            report = await build_report(self, hours=hours, drained_at=drained_at)
            if inspect is not None:
                await inspect(self)
        finally:
            self.driver.stop()
            self.cpu.uninstall(loop)
            if self.memory:
                tracemalloc.stop()
            await self.cloud.store.close()
        self.wall_s = time.perf_counter() - t_wall
        report.wall_s = round(self.wall_s, 2)
        report.cpu_by_stage = self.cpu.by_stage()
        return report

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
