"""A device hub behind a TCP proxy that cuts the link: after reconnecting, devices pull
their pending jobs and the rollout completes without waiting for a timeout."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path

import pytest

from agent.jobs import JobsClient
from cloud.fleet.coordinator import Coordinator
from cloud.fleet.protocol import Health, JobDocument
from cloud.fleet.spec import Gate, RolloutSpec, WavePlan
from cloud.fleet.states import DeviceState
from cloud.fleet.store_sqlite import SqliteFleetStore
from pymigrate.clock import WallClock
from transports.jobs_mqtt import MqttDeviceHub, MqttJobChannel

pytestmark = pytest.mark.integration


class CuttingProxy:
    """TCP forwarder to the broker that can drop every connection and refuse new ones."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.blocked = False
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.blocked:
            writer.transport.abort()
            return
        ur, uw = await asyncio.open_connection(self.host, self.port)
        self.writers += [writer, uw]
        for src, dst in ((reader, uw), (ur, writer)):
            t = asyncio.create_task(self._pipe(src, dst))
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        dst.transport.abort()

    def cut(self, *, block: bool) -> None:
        self.blocked = block
        for w in self.writers:
            w.transport.abort()
        self.writers.clear()

    async def close(self) -> None:
        self.cut(block=True)
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for t in list(self.tasks):
            t.cancel()


async def test_devices_pull_pending_jobs_after_reconnect(mosquitto: tuple[str, int],
                                                        tmp_path: Path) -> None:
    host, port = mosquitto
    prefix = f"pmrc-{uuid.uuid4().hex[:8]}"
    proxy = CuttingProxy(host, port)
    pport = await proxy.start()
    store = SqliteFleetStore(str(tmp_path / "fleet.db"))
    await store.open()
    coord = Coordinator(store=store, channel=MqttJobChannel(host, port, prefix=prefix),
                        clock=WallClock())
    await coord.start()
    await coord.add_devices([(f"r{i}", {}) for i in range(3)])
    hub = MqttDeviceHub("127.0.0.1", pport, prefix=prefix, client_id=f"{prefix}-hub",
                        max_backoff_s=0.5, timeout_s=1.0)
    await hub.start()
    clients = []
    for i in range(3):
        cfg = tmp_path / f"r{i}.toml"
        cfg.write_text("a = 1\n")
        c = JobsClient(f"r{i}", channel=hub.link(f"r{i}"), apply_config=lambda p: None,
                       health=lambda: Health(), clock=WallClock(), config_path=cfg,
                       check_delay_s=0.01, health_interval_s=0.05, soak_reports=1)
        await c.start()
        clients.append(c)
    try:
        proxy.cut(block=True)  # the devices' link is down while they get notified
        spec = RolloutSpec("rc", document=JobDocument(content="a = 2\n"),
                           plan=WavePlan(canary=3), soak_s=0.2, device_timeout_s=120,
                           max_notifications_per_min=60_000, gate=Gate(min_executed=3))
        r = await coord.create_rollout(spec)
        await coord.drain()
        assert r.counts[DeviceState.NOTIFIED] == 3
        await asyncio.sleep(0.3)  # the notifications are gone (clean session)
        proxy.blocked = False
        done = await asyncio.wait_for(coord.wait_finished("rc"), timeout=15)
        assert done.status == "completed"
        assert hub.reconnects >= 1
        assert all((tmp_path / f"r{i}.toml").read_text() == "a = 2\n" for i in range(3))
        assert done.attempts[0] == 0  # completed by the pull, not by a timeout retry
    finally:
        for c in clients:
            await c.stop()
        await hub.stop()
        await coord.stop()
        await store.close()
        await proxy.close()
