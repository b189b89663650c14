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
                 service: IngestService | None = None, clock: Clock | None = None) -> None:
        self.store = store
        self.servers = servers
        self.clock = clock or WallClock()
        self.service = service or IngestService(store, clock=self.clock)
        self._stop = asyncio.Event()
        self.ready = asyncio.Event()

    async def start(self) -> None:
        await self.store.open()
        started: list[IngestServer] = []
        try:
            for s in self.servers:
                await s.start(self.service.handle)
                started.append(s)
        except BaseException:
            for s in started:
                await s.stop()
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
        await self.store.close()

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        await self.start()
        try:
            await self._stop.wait()
        finally:
            await self.stop()

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
                    service=build_ingest(cfg, store, clock=clock))
