"""The agent daemon: one supervisor owning a TaskGroup of named stages.

sources -> [bounded queue] -> ingest (dedup, time, validate, aggregate) -> durable buffer
-> uploader -> transport. A stage that dies cancels its siblings; the error propagates
so the process exits non-zero and systemd restarts it. ``request_stop()`` (first signal)
stops gracefully: sources stop, the queue drains into the buffer, open windows are
persisted, open chunks sealed, the uploader drains within ``drain_timeout_s``, the buffer
closes. ``force_stop()`` (second signal) cancels everything at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import structlog

from agent.aggregate import Aggregator, make_degrader
from agent.buffer import DurableBuffer
from agent.clockjournal import ClockJournal
from agent.config import AgentConfig, resolve_device_id
from agent.dedup import Deduplicator
from agent.pipeline import IngestStage, PriorityMap
from agent.retry.backoff import agent_rng
from agent.sdnotify import Notifier
from agent.sources import SourceBatch, build_source
from agent.sources.base import Source
from agent.timesync import TimeCorrector
from agent.uploader import Uploader
from agent.validate import Validator
from pymigrate.clock import Clock, WallClock
from pymigrate.errors import ConfigError, PyMigrateError
from pymigrate.types import Ack
from transports.base import Uplink

log = structlog.get_logger("pymigrate.agent")


def build_uplinks(cfg: AgentConfig, clock: Clock | None = None) -> list[Uplink]:
    """Phase two for the uplink section: the ordered failover list of transports."""
    from transports.config import parse_transport
    from transports.registry import build_uplinks as _build

    typed = [parse_transport(n, getattr(cfg.uplink, n)) for n in cfg.uplink.transports]
    return _build(typed, cfg.device.id, clock=clock)


class Agent:
    """The edge agent. ``await agent.run()`` until stopped."""

    def __init__(self, config: AgentConfig, *, clock: Clock | None = None,
                 uplinks: Sequence[Uplink] | None = None,
                 sources: Sequence[Source] | None = None,
                 on_event: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        self.config = cfg = resolve_device_id(config)
        self.clock = clock or WallClock()
        self.device_id = cfg.device.id
        self.on_event = on_event
        bcfg = msgspec.structs.replace(cfg.buffer, path=str(cfg.data_path(cfg.buffer.path)))
        degrader = make_degrader(cfg.aggregation.degrade) if cfg.aggregation.degrade else None
        seed = cfg.retry.seed
        self.buffer = DurableBuffer(
            bcfg, clock=self.clock, on_event=self._event, degrader=degrader,
            new_instance=None if seed is None else
            (lambda: f"{agent_rng(cfg.device.id, seed).getrandbits(64):016x}"))
        self.timesync = TimeCorrector(cfg.timesync, clock=self.clock)
        # readings stamped without a clock model wait for one and are sent corrected
        self.clockjournal = (ClockJournal(self.timesync, self.buffer, clock=self.clock,
                                          hold_answers=cfg.timesync.hold_answers)
                             if cfg.timesync.enabled else None)
        self.dedup = Deduplicator(cfg.dedup, clock=self.clock)
        self.validator = Validator(cfg.validation, now_ms=self.timesync.now_ms)
        self.aggregator = Aggregator(cfg.aggregation, clock=self.clock)
        self.queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=cfg.pipeline.queue_size)
        self.ingest = IngestStage(self.queue, buffer=self.buffer, clock=self.clock,
                                  validator=self.validator, dedup=self.dedup,
                                  timesync=self.timesync, aggregator=self.aggregator,
                                  priorities=PriorityMap(cfg.priorities),
                                  clockjournal=self.clockjournal)
        self.uplinks = list(uplinks) if uplinks is not None else build_uplinks(cfg, self.clock)
        self.uploader = Uploader(self.buffer, self.uplinks, device_id=self.device_id,
                                 clock=self.clock, config=cfg.retry, on_ack=self._on_ack,
                                 on_event=self._event,
                                 wants_sync=self.timesync.wants_samples,
                                 clock_fix=self.clockjournal,
                                 retention_action=cfg.buffer.retention_action)
        self.sources: list[Source] = list(sources) if sources is not None else [
            build_source(s, device_id=self.device_id, clock=self.clock) for s in cfg.sources]
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self.started = asyncio.Event()
        self.stopped_cleanly = False
        self.notifier = Notifier.from_env()  # no-op unless run by systemd (NOTIFY_SOCKET)
        self.jobs: Any = None  # agent.jobs.JobsClient when [jobs] enabled
        self.metrics: Any = None  # agent.metrics.MetricsServer when [metrics] enabled
        self.runtime: dict[str, Any] = {}  # edge framework facts (agent.envconfig)

    # ----------------------------------------------------------------- callbacks
    def _event(self, name: str, data: dict[str, Any]) -> None:
        if self.on_event is not None:
            self.on_event(name, data)

    def _on_ack(self, ack: Ack, t1_ms: float, t4_ms: float) -> None:
        ok = self.timesync.add_sample(int(t1_ms), ack.t_recv_ms, ack.t_send_ms, int(t4_ms))
        if self.clockjournal is not None:
            self.clockjournal.on_sample(ok)

    async def _emit(self, batch: SourceBatch) -> None:
        await self.queue.put(batch)  # bounded: a full queue slows the source

    # ----------------------------------------------------------------- lifecycle
    def request_stop(self) -> None:
        """Graceful stop (first SIGTERM/SIGINT)."""
        self._stop.set()

    def force_stop(self) -> None:
        """Immediate stop (second signal): cancel every stage."""
        log.warning("forced stop: cancelling all stages")
        for t in self._tasks:
            t.cancel()

    async def run(self) -> None:
        """Run every stage until stopped; raises if a stage fails."""
        await self.buffer.open()
        try:
            if self.clockjournal is not None:  # before any reading of this run is stored
                await self.clockjournal.start()
            await self.ingest.restore()
            async with asyncio.TaskGroup() as tg:
                src_tasks = [tg.create_task(self._run_source(s),
                                            name=f"agent[source:{s.name}:{i}]")
                             for i, s in enumerate(self.sources)]
                ingest = tg.create_task(self.ingest.run(), name="agent[ingest]")
                upload = tg.create_task(self.uploader.run(), name="agent[uploader]")
                ctl = tg.create_task(self._controller(src_tasks, ingest, upload),
                                     name="agent[supervisor]")
                self._tasks = [*src_tasks, ingest, upload, ctl]
                if self.config.metrics.enabled:
                    from agent.metrics import MetricsServer

                    self.metrics = MetricsServer(self, self.config.metrics)
                    try:  # bind before READY: a busy port fails start, naming the key
                        await self.metrics.start()
                    except OSError as exc:
                        m = self.config.metrics
                        why = os.strerror(exc.errno) if exc.errno else str(exc)
                        raise ConfigError("metrics.port", f"cannot listen on {m.host}:{m.port}"
                                          f": {why}; is another agent using it? Stop it or "
                                          "choose another port") from exc
                    tg.create_task(self.metrics.serve_until(ctl), name="agent[metrics]")
                if self.config.jobs.enabled:
                    tg.create_task(self._run_jobs(), name="agent[jobs]")
                if self.notifier.enabled:
                    tg.create_task(self.notifier.run(
                        self.stages_alive, stop=self._stop, status=self._status_line,
                        stop_extend_s=self.config.pipeline.drain_timeout_s + 5.0),
                        name="agent[sdnotify]")
                self.started.set()
                log.info("agent started", device=self.device_id,
                         sources=[s.name for s in self.sources],
                         uplinks=[u.name for u in self.uplinks])
        finally:
            with contextlib.suppress(Exception):
                for u in self.uplinks:
                    await u.close()
            await self.buffer.close()
            log.info("agent stopped", clean=self.stopped_cleanly)

    async def _run_jobs(self) -> None:
        """Fleet jobs: apply config changes atomically (previous kept), report health."""
        from agent.jobs import JobError, JobsClient
        from transports.jobs_mqtt import MqttDeviceHub, tls_context
        from transports.jobs_security import load_public_key

        j = self.config.jobs
        if not self.config.source_file:
            log.warning("jobs enabled but the agent was not started from a config file")
            return
        verify_key = (load_public_key(j.verify_key, key="jobs.verify_key") if j.verify_key
                      else None)
        hub: Any
        if j.protocol == "aws-iot":  # AWS IoT Jobs reserved topics, thing = device id
            from transports.jobs_aws import AwsJobsLink

            hub = link = AwsJobsLink(j.host, j.port, self.device_id,
                                     client_id=f"{self.device_id}-jobs",
                                     username=j.username or None,
                                     password=j.password or None, clock=self.clock,
                                     tls=tls_context("jobs", j.ca_file, j.cert_file,
                                                     j.key_file))
            verify_key = None  # AWS IoT authenticates the topics; images stay signed
        else:
            hub = MqttDeviceHub(j.host, j.port, prefix=j.prefix,
                                client_id=f"{self.device_id}-jobs",
                                username=j.username or None, password=j.password or None,
                                will_device=self.device_id, clock=self.clock,
                                tls=tls_context("jobs", j.ca_file, j.cert_file, j.key_file))
            link = hub.link(self.device_id)

        async def apply_config(path: Path) -> None:
            from agent.reload import reload_agent

            result = await reload_agent(self, path)
            if not result.ok:
                raise JobError(f"config refused: {result.error}", reason="invalid_config")

        firmware = None
        if j.firmware.enabled:
            from agent.firmware import FirmwareUpdater
            from transports._common import client_tls_context

            f = j.firmware
            firmware = FirmwareUpdater(
                self.config.data_path(f.dir),
                verify_key=load_public_key(f.verify_key, key="jobs.firmware.verify_key"),
                install_cmd=f.install_cmd, health_cmd=f.health_cmd,
                rollback_cmd=f.rollback_cmd, clock=self.clock, max_bytes=f.max_bytes,
                health_delay_s=f.health_delay_s, cmd_timeout_s=f.cmd_timeout_s,
                download_retries=f.download_retries,
                ssl_ctx=client_tls_context("jobs.firmware", f.ca_file, "", "")
                if f.ca_file else None)
        self.jobs = JobsClient(self.device_id, channel=link,
                               apply_config=apply_config, health=self.health,
                               clock=self.clock, config_path=self.config.source_file,
                               check_delay_s=j.check_delay_s,
                               health_interval_s=j.health_interval_s,
                               heartbeat_s=j.heartbeat_s, verify_key=verify_key,
                               secrets_file=j.secrets_file or None, firmware=firmware)
        await hub.start()
        try:
            await self.jobs.start()
            await self._stop.wait()
        finally:
            await self.jobs.stop()
            await hub.stop()

    def health(self) -> Any:
        """The health a device reports to the fleet coordinator (gates and soak)."""
        from transports.jobs_protocol import Health

        b = self.buffer.stats()
        up = self.uploader.stats()
        lag = 0.0 if b.oldest_ts_ms is None else max(
            0.0, (self.clock.time_ms() - b.oldest_ts_ms) / 1000.0)
        limit = self.config.jobs.max_backlog_bytes
        ok = all(self.stages_alive().values()) and not (limit and b.payload_bytes > limit)
        return Health(ok=ok, online=True, backlog_bytes=b.payload_bytes, lag_s=lag,
                      error_rate=round(1.0 - float(up.get("success_rate", 1.0) or 0.0), 4))

    async def _run_source(self, source: Source) -> None:
        await source.run(self._emit)
        log.info("source finished", source=source.name)
        finite = [s for s in self.sources if getattr(s, "exit_when_done", False)]
        if source in finite and all(getattr(s, "done", False) for s in finite):
            log.info("every exit_when_done source finished: stopping")
            self.request_stop()

    async def _controller(self, sources: list[asyncio.Task[None]], ingest: asyncio.Task[None],
                          upload: asyncio.Task[None]) -> None:
        await self._stop.wait()
        log.info("stopping: sources")
        for t in sources:
            t.cancel()
        await asyncio.gather(*sources, return_exceptions=True)
        log.info("stopping: draining ingest queue into the buffer")
        await self.ingest.stop()
        await ingest
        await self.buffer.flush()
        log.info("stopping: uploader drain", deadline_s=self.config.pipeline.drain_timeout_s)
        drained = await self.uploader.drain(self.config.pipeline.drain_timeout_s)
        if not upload.done():
            self.uploader.stop()
            try:
                await asyncio.wait_for(asyncio.shield(upload), 2.0)
            except TimeoutError:
                log.warning("uploader did not stop in time: cancelling")
                upload.cancel()
        if self.clockjournal is not None:  # the newest samples, for the next run
            try:
                await self.clockjournal.save()
            except PyMigrateError as exc:  # a full disk: the last staged copy stays
                log.warning("clock journal not saved at stop", error=str(exc))
        self.stopped_cleanly = True
        log.info("stopped", drained=drained)

    @property
    def stopping(self) -> bool:
        """True once a graceful stop was requested."""
        return self._stop.is_set()

    def stages_alive(self) -> dict[str, bool]:
        """Stage name -> alive (running, or finished without error: a finite source)."""
        return {t.get_name().removeprefix("agent[").removesuffix("]"):
                not t.done() or (not t.cancelled() and t.exception() is None)
                for t in self._tasks}

    def _status_line(self) -> str:
        c = self.ingest.counts
        return (f"accepted={c['accepted']} buffered_chunks={self.buffer.stats().chunks_pending}"
                f" delivered={self.uploader.stats().get('readings_acked', 0)}")

    def status(self) -> dict[str, Any]:
        """A health/progress view for `pymigrate run`, metrics and the health endpoint."""
        b = self.buffer.stats()
        up = self.uploader.stats()
        return {
            "device": self.device_id,
            "received": self.ingest.counts["received"],
            "accepted": self.ingest.counts["accepted"],
            "rejected": dict(self.validator.rejected),
            "duplicates_dropped": self.ingest.counts["duplicates_dropped"],
            "buffered_chunks": b.chunks_pending,
            "buffered_readings": sum(b.readings_pending.values()),
            "buffer_bytes": b.bytes_on_disk,
            "evicted": dict(b.evicted),
            "quarantined": b.quarantined,
            "delivered": up.get("readings_acked", 0),
            "batches_acked": up.get("batches_acked", 0),
            "batches_failed": up.get("batches_failed", 0),
            "clock": {**self.timesync.status(),
                      **(self.clockjournal.status() if self.clockjournal else {})},
            "uplinks": up.get("uplinks", {}),
        }
