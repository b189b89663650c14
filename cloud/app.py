"""The cloud ingest program: a store, an IngestService and its listeners (phase two)."""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from cloud.ingest import IngestService
from cloud.stores.base import Store
from pymigrate.clock import Clock, WallClock
from transports.base import IngestServer

log = structlog.get_logger("pymigrate.cloud")


class CloudApp:
    """Opens the store, starts every listener, serves until stopped."""

    def __init__(self, store: Store, servers: list[IngestServer], *,
                 service: IngestService | None = None, clock: Clock | None = None,
                 completeness_interval_s: float = 0.0) -> None:
        self.store = store
        self.completeness_interval_s = completeness_interval_s
        # device -> summary of the last accounting (cloud.audit.device_summary)
        self.completeness: dict[str, dict[str, Any]] = {}
        self.completeness_at_ms = 0
        self.servers = servers
        self.clock = clock or WallClock()
        self.service = service or IngestService(store, clock=self.clock)
        self._stop = asyncio.Event()
        self.ready = asyncio.Event()

    async def start(self) -> None:
        await self.store.open()
        started: list[IngestServer] = []
        try:
            await self.service.open()
            for s in self.servers:
                await s.start(self.service.handle)
                started.append(s)
        except BaseException:
            for s in started:
                await s.stop()
            await self.service.close()
            await self.store.close()
            raise
        self.ready.set()
        log.info("cloud ingest ready", store=self.store.name,
                 listeners=[s.name for s in self.servers])

    async def stop(self) -> None:
        for s in self.servers:
            try:
                await s.stop()
            except Exception as exc:  # keep stopping the others
                log.warning("listener stop failed", listener=s.name, error=str(exc))
        await self.service.close()
        await self.store.close()

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        await self.start()
        audit = None
        if self.completeness_interval_s > 0 and hasattr(self.store, "completeness"):
            audit = asyncio.create_task(self._account_forever(), name="cloud[completeness]")
        try:
            await self._stop.wait()
        finally:
            if audit is not None:
                audit.cancel()
                await asyncio.gather(audit, return_exceptions=True)
            await self.stop()

    async def account(self) -> None:
        """Account every stream once (the completeness metrics read the result)."""
        from cloud.audit import device_summary

        streams = await self.store.completeness()  # type: ignore[attr-defined]
        by_dev: dict[str, list[Any]] = {}
        for s in streams:
            by_dev.setdefault(s.device_id, []).append(s)
        self.completeness = {d: device_summary(d, ss) for d, ss in by_dev.items()}
        self.completeness_at_ms = self.clock.time_ms()
        bad = {d: s["unexplained"] for d, s in self.completeness.items() if s["unexplained"]}
        if bad:
            log.warning("readings neither stored nor accounted for by a gap",
                        devices=dict(list(bad.items())[:20]), total=sum(bad.values()))

    async def _account_forever(self) -> None:
        while True:
            try:
                await self.account()
            except Exception as exc:  # an audit failure must not stop the ingest
                log.error("completeness accounting failed", error=str(exc)[:300])
            await self.clock.sleep(self.completeness_interval_s)

    def status(self) -> dict[str, Any]:
        return dict(self.service.counters)


def build_servers(cfg: Any, *, clock: Clock | None = None) -> list[IngestServer]:
    """The listeners named in ``cloud.listeners`` (phase two)."""
    from transports.config import parse_transport
    from transports.registry import build_ingest_server

    out: list[IngestServer] = []
    for name in cfg.listeners:
        if name == "coap":
            tcfg = parse_transport("coap", {"host": cfg.coap.host, "port": cfg.coap.port},
                                   section="cloud")
        else:
            tcfg = parse_transport(name, dict(getattr(cfg, name, {}) or {}), section="cloud")
        out.append(build_ingest_server(tcfg, clock=clock))
    return out


def build_cloud_app(section: dict[str, Any], *, clock: Clock | None = None) -> CloudApp:
    """Build the app from the ``[cloud]`` table of a config file."""
    from cloud.config import build_ingest, build_store, parse_cloud_config

    cfg = parse_cloud_config(section)
    store = build_store(cfg, clock=clock)
    return CloudApp(store, build_servers(cfg, clock=clock), clock=clock,
                    service=build_ingest(cfg, store, clock=clock),
                    completeness_interval_s=cfg.completeness_interval_s)
