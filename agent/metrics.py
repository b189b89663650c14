"""Prometheus metrics and a JSON health endpoint for one agent, over a tiny asyncio HTTP server.

Nothing here keeps its own counters: a custom :class:`AgentCollector` reads the stages'
own counters (``agent.status()``, ``buffer.stats()``, ``uploader.stats()``,
``timesync.status()``, ``aggregator.stats()``) at scrape time, so a value is counted in
exactly one place and the metrics can never drift from the health view. Each agent gets a
dedicated :class:`~prometheus_client.CollectorRegistry` (never the global one), so two
agents in one process (tests, simulations) do not collide.

``GET /metrics``  Prometheus text exposition (``text/plain; version=0.0.4``)
``GET /health``   JSON: per-stage liveness, backlog, oldest data age, breakers, clock;
                  HTTP 200 when every stage is alive, 503 otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from pymigrate import __version__

if TYPE_CHECKING:
    from agent.config import MetricsConfig
    from agent.supervisor import Agent

__all__ = ["BREAKER_CODES", "AgentCollector", "HttpEndpoint", "MetricsServer", "health",
           "json_route", "make_registry", "metrics_route"]

log = structlog.get_logger("pymigrate.agent.metrics")

P = "pymigrate_agent_"
BREAKER_CODES = {"closed": 0, "half_open": 1, "open": 2}
_MAX_ATTEMPT_LABEL = 10  # attempts >= 10 share one label: bounded label cardinality
_MAX_REQUEST = 8192


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(P + name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(P + name, doc, value=value)


def oldest_age_s(agent: Agent) -> float:
    """Age in seconds of the oldest reading still held by the buffer (0 when empty)."""
    oldest = agent.buffer.stats().oldest_ts_ms
    if oldest is None:
        return 0.0
    return max(0.0, (agent.clock.time_ms() - oldest) / 1000.0)


class AgentCollector(Collector):
    """Reads one agent's stage counters at scrape time and exposes them."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        a = self.agent
        yield InfoMetricFamily(P[:-1], "Agent identity",
                               value={"device": a.device_id, "version": __version__})
        yield from self._ingest(a)
        yield from self._buffer(a)
        yield from self._uploader(a)
        yield from self._clock(a)
        yield from self._aggregation(a)
        alive = GaugeMetricFamily(P + "stage_up", "1 while a stage task is alive",
                                  labels=["stage"])
        for stage, ok in a.stages_alive().items():
            alive.add_metric([stage], 1.0 if ok else 0.0)
        yield alive

    @staticmethod
    def _ingest(a: Agent) -> Iterator[Metric]:
        c = a.ingest.counts
        yield _counter("readings_received", "Readings received from sources", c["received"])
        yield _counter("readings_accepted", "Readings committed to the durable buffer",
                       c["accepted"])
        yield _counter("readings_duplicates_dropped", "Re-sent readings dropped by edge dedup",
                       c["duplicates_dropped"])
        rej = CounterMetricFamily(P + "readings_rejected", "Readings rejected at ingest",
                                  labels=["reason"])
        for reason, n in sorted(a.validator.rejected.items()):
            rej.add_metric([reason], n)
        yield rej
        yield _counter("buffer_full_waits", "Times ingest held readings on a full buffer",
                       c["buffer_full_waits"])

    @staticmethod
    def _buffer(a: Agent) -> Iterator[Metric]:
        b = a.buffer.stats()
        ev = CounterMetricFamily(P + "chunks_evicted",
                                 "Chunks evicted from the buffer (budget, retention ...)",
                                 labels=["reason", "priority"])
        for key, n in sorted(b.evicted.items()):
            reason, _, prio = key.partition(":")
            ev.add_metric([reason, prio or "unknown"], n)
        yield ev
        yield _counter("readings_evicted", "Readings lost to eviction", b.evicted_readings)
        yield _counter("chunks_quarantined", "Corrupt chunks quarantined", b.quarantined)
        yield _counter("chunks_degraded", "Low-priority chunks compacted to aggregates",
                       b.degraded)
        yield _counter("buffer_commits", "Buffer write transactions", b.commits)
        yield _gauge("buffer_bytes", "Buffer database size on disk (db + WAL)", b.bytes_on_disk)
        yield _gauge("buffer_payload_bytes", "Compressed chunk bytes held", b.payload_bytes)
        yield _gauge("buffer_budget_bytes", "Configured buffer byte budget",
                     a.config.buffer.budget_bytes)
        yield _gauge("buffer_chunks_pending", "Sealed chunks waiting for upload",
                     b.chunks_pending)
        yield _gauge("buffer_chunks_in_flight", "Chunks in batches being sent", b.in_flight)
        yield _gauge("buffer_gaps_pending",
                     "Gap records (sequence numbers never to be delivered) not yet acked",
                     b.gaps_pending)
        pend = GaugeMetricFamily(P + "buffer_readings_pending", "Readings waiting for upload",
                                 labels=["priority"])
        for prio, n in sorted(b.readings_pending.items()):
            pend.add_metric([prio], n)
        yield pend
        age = 0.0
        if b.oldest_ts_ms is not None:
            age = max(0.0, (a.clock.time_ms() - b.oldest_ts_ms) / 1000.0)
        yield _gauge("buffer_oldest_data_age_seconds",
                     "Age of the oldest reading not yet delivered (0 when empty)", age)

    @staticmethod
    def _uploader(a: Agent) -> Iterator[Metric]:
        up = a.uploader.stats()
        for key, doc in (("batches_sent", "Batch send attempts"),
                         ("batches_acked", "Batches acknowledged end to end"),
                         ("batches_failed", "Batch attempts that failed (retried)"),
                         ("batches_throttled", "Batch attempts the cloud throttled"),
                         ("batches_rejected", "Batches the cloud rejected (dead-lettered)"),
                         ("bytes_sent", "Payload bytes sent"),
                         ("readings_acked", "Readings delivered (acked end to end)"),
                         ("readings_dead_lettered", "Readings given up on (rejected, expired)"),
                         ("sync_pings", "Empty batches sent to sample the clock")):
            yield _counter(key, doc, up.get(key, 0))
        att = CounterMetricFamily(P + "batch_attempts",
                                  "Acked batches by the attempt that delivered them",
                                  labels=["attempt"])
        folded: dict[str, int] = {}
        for n, count in up.get("attempts", {}).items():
            label = str(n) if int(n) < _MAX_ATTEMPT_LABEL else f"{_MAX_ATTEMPT_LABEL}+"
            folded[label] = folded.get(label, 0) + count
        for label, count in folded.items():
            att.add_metric([label], count)
        yield att
        dl = CounterMetricFamily(P + "dead_letters", "Dead-lettered batches by reason",
                                 labels=["reason"])
        for reason, n in sorted(up.get("dead_letters", {}).items()):
            dl.add_metric([reason], n)
        yield dl
        yield _gauge("inflight_batches", "Batches in flight", up.get("inflight", 0))
        yield _gauge("inflight_limit", "AIMD in-flight limit", up.get("inflight_limit", 0))
        yield _gauge("batch_limit_bytes", "AIMD batch size limit", up.get("batch_limit_bytes", 0))
        yield _gauge("rtt_seconds", "Smoothed round-trip time (EWMA)", up.get("rtt_ewma_s") or 0)
        yield _gauge("rtt_deviation_seconds", "RTT mean deviation", up.get("rtt_dev_s") or 0)
        yield _gauge("upload_success_ratio", "EWMA of attempt success",
                     up.get("success_rate") or 0)
        yield _gauge("throughput_bytes_per_second", "EWMA upload throughput",
                     up.get("throughput_bps") or 0)
        br = GaugeMetricFamily(P + "breaker_state",
                               "Circuit breaker per uplink: 0 closed, 1 half-open, 2 open",
                               labels=["uplink"])
        per = CounterMetricFamily(P + "uplink_events", "Per-uplink outcomes",
                                  labels=["uplink", "event"])
        for name, u in sorted(up.get("uplinks", {}).items()):
            br.add_metric([name], BREAKER_CODES.get(str(u.get("breaker")), -1))
            for k, v in sorted(u.items()):
                if isinstance(v, int | float) and not isinstance(v, bool):
                    per.add_metric([name, k], v)
        yield br
        yield per

    @staticmethod
    def _clock(a: Agent) -> Iterator[Metric]:
        st = a.timesync.status()
        offset = st.get("offset_ms")
        yield _gauge("clock_offset_seconds", "Estimated device clock offset to the cloud",
                     float(offset) / 1000.0 if isinstance(offset, int | float) else 0.0)
        drift = st.get("drift_ppm")
        yield _gauge("clock_drift_ppm", "Estimated device clock drift",
                     float(drift) if isinstance(drift, int | float) else 0.0)
        yield _gauge("clock_synced", "1 when the clock model is synced to the cloud",
                     1.0 if st.get("state") == "synced" else 0.0)
        for key in ("jumps", "rtc_resets", "samples_accepted"):
            v = st.get(key)
            if isinstance(v, int):
                yield _counter(f"clock_{key}", f"Time sync: {key.replace('_', ' ')}", v)

    @staticmethod
    def _aggregation(a: Agent) -> Iterator[Metric]:
        s = a.aggregator.stats()
        yield _counter("aggregation_readings_in", "Readings into aggregation", s.readings_in)
        yield _counter("aggregation_readings_out", "Readings out of aggregation (raw + aggregates)",
                       s.readings_out)
        yield _gauge("aggregation_ratio", "Readings out / readings in (lower saves more)",
                     s.aggregation_ratio)


def make_registry(agent: Agent, *, process: bool = True) -> CollectorRegistry:
    """A dedicated registry with the agent collector (and the process collector)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(AgentCollector(agent))
    if process:
        ProcessCollector(namespace="pymigrate_agent", registry=reg)
    return reg


def health(agent: Agent) -> dict[str, Any]:
    """The ``/health`` document: ``healthy`` is false when any stage task is not alive, or
    when the cloud refuses this device for a reason a resend cannot fix (``blocked``:
    uplink -> reason, e.g. ``device_mismatch``; ``identity`` -> ``conflict``), or when the
    buffer cannot store for lack of disk space (``blocked["buffer"] = "disk_full"``: the
    agent keeps uploading and freeing space, ingest is held back)."""
    stages = agent.stages_alive()
    b = agent.buffer.stats()
    up = agent.uploader.stats()
    clock = agent.timesync.status()
    stopping = agent.stopping
    alive = bool(stages) and all(stages.values())
    blocked = dict(up.get("blocked", {}))
    if b.disk_full:
        blocked["buffer"] = "disk_full"
    healthy = alive and not blocked
    breakers = {n: str(u.get("breaker")) for n, u in up.get("uplinks", {}).items()}
    if not alive:
        state = ("stopping" if stopping else "failing" if agent.started.is_set()
                 else "starting")
    elif blocked.get("buffer") == "disk_full":
        state = "disk_full"  # nowhere to store: ingest held back until space returns
    elif blocked:
        state = "blocked"  # the cloud refuses us for a reason only a person can fix
    elif breakers and all(v == "open" for v in breakers.values()):
        state = "degraded"  # alive, buffering, but no uplink is usable right now
    else:
        state = "ok"
    return {
        "status": state,
        "healthy": healthy,
        "device": agent.device_id,
        "version": __version__,
        "stages": stages,
        "backlog": {"chunks": b.chunks_pending, "readings": sum(b.readings_pending.values()),
                    "bytes": b.payload_bytes, "by_priority": dict(b.readings_pending)},
        "storage": {"state_bytes": b.state_bytes, "budget_bytes": b.budget_bytes,
                    "effective_budget_bytes": b.effective_budget_bytes,
                    "disk_full": b.disk_full, "disk_full_errors": b.disk_full_errors,
                    "evicted_readings": b.evicted_readings},
        "oldest_data_age_s": oldest_age_s(agent),
        "breakers": breakers,
        "blocked": blocked,
        "clock": {k: clock.get(k) for k in ("state", "offset_ms", "drift_ppm", "uncert_ms",
                                            "rtc_trusted", "samples")},
        "counts": {"accepted": agent.ingest.counts["accepted"],
                   "rejected": sum(agent.validator.rejected.values()),
                   "evicted": sum(b.evicted.values()),
                   "delivered": up.get("readings_acked", 0)},
        "runtime": dict(agent.runtime),
    }


Route = Callable[[], tuple[int, str, bytes]]


class HttpEndpoint:
    """A tiny asyncio HTTP/1.1 server for GET/HEAD of fixed paths (no threads).

    ``start()`` binds (so a port conflict fails start-up, before READY); ``serve_until(aw)``
    keeps serving until ``aw`` completes, then closes. Used by the agent, the cloud ingest
    and the coordinator.
    """

    def __init__(self, routes: dict[str, Route], host: str, port: int, *,
                 name: str = "metrics") -> None:
        self.routes = routes
        self.host = host
        self.bind_port = port
        self.name = name
        self._server: asyncio.Server | None = None
        self.requests = 0

    @property
    def port(self) -> int:
        """The bound port (useful with ``port = 0``)."""
        if self._server is None or not self._server.sockets:
            return self.bind_port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.bind_port)
        log.info(f"{self.name} listening", host=self.host, port=self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def rebind(self, host: str, port: int) -> None:
        """Listen on ``host:port`` instead; on failure the old binding is restored and the
        error re-raised."""
        old = (self.host, self.port)  # the bound port, also when configured as 0
        await self.close()
        self.host, self.bind_port = host, port
        try:
            await self.start()
        except OSError:
            self.host, self.bind_port = old
            await self.start()
            raise

    async def serve_until(self, until: Awaitable[Any]) -> None:
        """Run as a named stage: serve until ``until`` (e.g. the supervisor) ends."""
        if self._server is None:
            await self.start()
        try:
            await asyncio.wait([asyncio.ensure_future(until)])
        finally:
            await self.close()

    def render(self, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for a GET of ``path``."""
        route = self.routes.get(path.split("?", 1)[0])
        if route is not None:
            return route()
        if path == "/":
            index = " ".join(sorted(self.routes)).encode()
            return 200, "text/plain; charset=utf-8", b"pymigrate: " + index + b"\n"
        return 404, "text/plain; charset=utf-8", b"not found\n"

    async def _handle(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            if len(head) > _MAX_REQUEST:
                raise ValueError("request too large")
            method, path, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            self.requests += 1
            if method not in ("GET", "HEAD"):
                status, ctype, body = 405, "text/plain", b"method not allowed\n"
            else:
                status, ctype, body = self.render(path)
            reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed",
                      503: "Service Unavailable"}.get(status, "OK")
            hdr = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                   f"Content-Length: {len(body)}\r\nConnection: close\r\n"
                   f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S GMT', time.gmtime())}\r\n\r\n")
            writer.write(hdr.encode() + (b"" if method == "HEAD" else body))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                ValueError, ConnectionError):
            pass  # a broken or slow client only loses its own request
        except Exception as exc:  # a scrape must never take the service down
            log.warning("metrics request failed", error=str(exc), error_type=type(exc).__name__)
            with contextlib.suppress(Exception):
                writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n"
                             b"Connection: close\r\n\r\n")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def json_route(doc: Callable[[], dict[str, Any]], ok_key: str = "healthy") -> Route:
    """A route answering ``doc()`` as JSON: 200 when ``doc[ok_key]`` is true, else 503."""

    def route() -> tuple[int, str, bytes]:
        d = doc()
        return (200 if d.get(ok_key) else 503, "application/json",
                json.dumps(d, default=str).encode())

    return route


def metrics_route(registry: CollectorRegistry) -> Route:
    """A route answering the Prometheus text exposition of ``registry``."""
    return lambda: (200, CONTENT_TYPE_LATEST, generate_latest(registry))


class MetricsServer(HttpEndpoint):
    """``/metrics`` and ``/health`` for one agent (a dedicated registry per agent)."""

    def __init__(self, agent: Agent, config: MetricsConfig) -> None:
        self.agent = agent
        self.config = config
        self.registry = make_registry(agent)
        super().__init__({"/metrics": metrics_route(self.registry),
                          "/health": json_route(lambda: health(agent))},
                         config.host, config.port)

    async def rebind_config(self, config: MetricsConfig) -> None:
        """SIGHUP: move to ``config``'s host/port."""
        await self.rebind(config.host, config.port)
        self.config = config
