"""1,000 simulated devices as real MQTT job sessions against the local Mosquitto.

Device sessions are multiplexed over 10 connections (100 devices each), but every
device has its own subscription and its own topics: each notify/start/update/result is
a real MQTT message on that device's topic. Wall clock; bounded to well under 60 s.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest

from agent.jobs import JobError, JobsClient
from cloud.fleet.coordinator import Coordinator
from cloud.fleet.protocol import Health, JobDocument, JobResult, encode
from cloud.fleet.spec import Gate, RolloutSpec, WavePlan
from cloud.fleet.states import DeviceState
from cloud.fleet.store_sqlite import SqliteFleetStore
from pymigrate.clock import WallClock
from pymigrate.errors import TransportError
from transports.jobs_mqtt import MqttDeviceHub, MqttJobChannel, publish_once, topic

pytestmark = pytest.mark.integration
S = DeviceState
OLD, NEW = "mode = 'old'\n", "mode = 'new'\n"


async def _fleet(host: str, port: int, prefix: str, tmp: Path, n: int, per_hub: int,
                 *, unhealthy: set[int], failing: set[int]
                 ) -> tuple[list[MqttDeviceHub], list[JobsClient]]:
    clock = WallClock()
    hubs = [MqttDeviceHub(host, port, prefix=prefix, client_id=f"{prefix}-hub{h}")
            for h in range(n // per_hub)]
    await asyncio.gather(*(h.start() for h in hubs))
    clients: list[JobsClient] = []
    for i in range(n):
        cfg = tmp / f"d{i:04d}.toml"
        cfg.write_text(OLD)

        def apply(path: Path, i: int = i) -> None:
            if i in failing and path.read_text() == NEW:
                raise JobError("rejected by the pipeline")

        clients.append(JobsClient(
            f"d{i:04d}", channel=hubs[i // per_hub].link(f"d{i:04d}"), apply_config=apply,
            health=(lambda: Health(ok=False)) if i in unhealthy else (lambda: Health()),
            clock=clock, config_path=cfg, check_delay_s=0.05, health_interval_s=0.1,
            soak_reports=2))
    await asyncio.gather(*(c.start() for c in clients))
    return hubs, clients


async def test_rollout_over_mqtt_with_1000_devices(mosquitto: tuple[str, int],
                                                   tmp_path: Path) -> None:
    host, port = mosquitto
    prefix = f"pmtest-{uuid.uuid4().hex[:8]}"
    n = 1000
    t0 = time.monotonic()
    store = SqliteFleetStore(str(tmp_path / "fleet.db"))
    await store.open()
    coord = Coordinator(store=store, channel=MqttJobChannel(host, port, prefix=prefix),
                        clock=WallClock())
    await coord.start()
    await coord.add_devices([(f"d{i:04d}", {"region": "eu"}) for i in range(n)])
    unhealthy = set(range(7, n, 100))  # 10 devices fail their own post-update check
    hubs, clients = await _fleet(host, port, prefix, tmp_path, n, 100,
                                 unhealthy=unhealthy, failing=set())
    try:
        spec = RolloutSpec("mqtt-1k", document=JobDocument(content=NEW),
                           plan=WavePlan(canary_pct=5, growth=3), soak_s=0.5,
                           device_timeout_s=20, max_in_flight=400,
                           max_notifications_per_min=120_000,
                           gate=Gate(success_threshold=0.95, min_executed=20))
        await coord.create_rollout(spec)
        r = await asyncio.wait_for(coord.wait_finished("mqtt-1k"), timeout=45)
        elapsed = time.monotonic() - t0
        assert r.status == "completed", r.progress(coord.now())
        assert r.counts[S.SUCCEEDED] == n - len(unhealthy)
        assert r.counts[S.FAILED] == len(unhealthy)
        assert [w.end - w.start for w in r.waves] == [50, 150, 450, 350]
        for i in range(n):
            text = (tmp_path / f"d{i:04d}.toml").read_text()
            assert text == (OLD if i in unhealthy else NEW)
        assert all((tmp_path / f"d{i:04d}.toml.prev").read_text() == OLD for i in range(n))
        # a device reporting on a job it does not own (another device's id in its
        # document) is refused over MQTT too
        d1 = clients[1]
        await d1.channel.publish("result", encode(JobResult("d0002", "mqtt-1k", "failed")))
        await asyncio.wait_for(_until(lambda: d1.refusals == 1), timeout=5)
        assert coord.refused == 1 and r.device_state(2) == S.SUCCEEDED
        await coord.flush()
        counts = await store.state_counts("mqtt-1k")
        assert counts == {S.SUCCEEDED: n - len(unhealthy), S.FAILED: len(unhealthy)}
        assert await store.transition_count("mqtt-1k") == coord.transitions
        print(f"1000-device MQTT rollout: {elapsed:.1f} s wall, "
              f"{r.notifications} notifications, {coord.transitions} transitions")
        assert elapsed < 60
    finally:
        for c in clients:
            await c.stop()
        await asyncio.gather(*(h.stop() for h in hubs))
        await coord.stop()
        await store.close()


async def test_gate_abort_rolls_back_over_mqtt(mosquitto: tuple[str, int],
                                               tmp_path: Path) -> None:
    host, port = mosquitto
    prefix = f"pmtest-{uuid.uuid4().hex[:8]}"
    n = 100
    store = SqliteFleetStore(str(tmp_path / "fleet.db"))
    await store.open()
    coord = Coordinator(store=store, channel=MqttJobChannel(host, port, prefix=prefix),
                        clock=WallClock())
    await coord.start()
    await coord.add_devices([(f"d{i:04d}", {}) for i in range(n)])
    hubs, clients = await _fleet(host, port, prefix, tmp_path, n, 50, unhealthy=set(),
                                 failing=set(range(0, n, 3)))
    try:
        spec = RolloutSpec("mqtt-rb", document=JobDocument(content=NEW),
                           plan=WavePlan(canary=20), soak_s=0.3, device_timeout_s=10,
                           max_notifications_per_min=60_000,
                           rollback_plan=WavePlan(canary=3, growth=2),
                           gate=Gate(success_threshold=0.9, min_executed=5))
        await coord.create_rollout(spec)
        r = await asyncio.wait_for(coord.wait_finished("mqtt-rb"), timeout=30)
        assert r.status == "rolled_back"
        assert r.counts[S.ROLLED_BACK] > 0
        assert r.counts[S.QUEUED] >= 80
        for i in range(n):
            assert (tmp_path / f"d{i:04d}.toml").read_text() == OLD
    finally:
        for c in clients:
            await c.stop()
        await asyncio.gather(*(h.stop() for h in hubs))
        await coord.stop()
        await store.close()


async def test_transport_errors_are_translated(mosquitto: tuple[str, int]) -> None:
    chan = MqttJobChannel("127.0.0.1", 1, prefix="x")
    with pytest.raises(TransportError):
        await chan.start(_noop)
    with pytest.raises(TransportError):
        await chan.send("d", "notify", b"{}")
    with pytest.raises(TransportError):
        await publish_once("127.0.0.1", 1, "x/fleet/control", b"{}")
    assert topic("p", "d1", "notify") == "p/jobs/d1/notify"


async def _noop(dev: str, kind: str, payload: bytes) -> None:
    return None


async def _until(pred: object) -> None:
    assert callable(pred)
    for _ in range(500):  # bounded wait for a reply over the real broker
        if pred():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")
