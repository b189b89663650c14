"""MQTT specifics against the real Mosquitto: shared subscriptions split the load, MQTT
3.1.1 fallback, persistent sessions, PUBACK-only mode, rejections, dead broker."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from cloud.ingest import IngestService
from pymigrate.errors import PayloadRejected, TransportError
from pymigrate.types import Ack
from tests.conftest import free_port
from tests.integration import transport_support
from tests.integration.transport_support import (
    RecordingStore,
    make_batch,
    plan_batches,
    send_until_acked,
)
from transports.base import Incoming
from transports.config import MqttConfig
from transports.mqtt import MqttIngestServer, MqttUplink

pytestmark = pytest.mark.integration
fresh_structlog = transport_support.fresh_structlog  # autouse: see its docstring


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[RecordingStore]:
    s = RecordingStore(tmp_path / "s.db")
    await s.open()
    yield s
    await s.close()


def _cfg(mosquitto: tuple[str, int], **kw: object) -> MqttConfig:
    u = uuid.uuid4().hex[:10]
    base = MqttConfig(host=mosquitto[0], port=mosquitto[1], prefix=f"pmtest/{u}",
                      share_group=f"g{u}", connect_timeout_s=3.0)
    return msgspec.structs.replace(base, **kw)


async def test_shared_subscription_splits_load(mosquitto: tuple[str, int],
                                               store: RecordingStore) -> None:
    cfg = _cfg(mosquitto)
    service = IngestService(store)
    replicas = [MqttIngestServer(cfg) for _ in range(2)]
    for r in replicas:
        await r.start(service.handle)
    try:
        devices = [f"sh{uuid.uuid4().hex[:8]}" for _ in range(4)]

        async def run(device: str) -> None:
            up = MqttUplink(cfg, device_id=device)
            for batch_id, payload, _ in plan_batches(device, 10):
                ack = await up.send(payload, batch_id=batch_id, timeout=5)
                assert ack.status == "ok"
            await up.close()

        await asyncio.gather(*(run(d) for d in devices))
    finally:
        for r in replicas:
            await r.stop()
    assert sum(r.handled for r in replicas) == 40
    assert all(r.handled > 0 for r in replicas), [r.handled for r in replicas]
    for d in devices:
        assert await store.count(d) == 200


@pytest.mark.parametrize(("device_proto", "ingest_proto"),
                         [("3.1.1", "3.1.1"), ("3.1.1", "5"), ("5", "3.1.1")])
async def test_mqtt311_fallback(mosquitto: tuple[str, int], store: RecordingStore,
                                device_proto: str, ingest_proto: str) -> None:
    """Without MQTT 5 properties the ack goes to the conventional topic, matched by the
    batch id inside the Ack."""
    cfg = _cfg(mosquitto, protocol=ingest_proto)
    server = MqttIngestServer(cfg)
    await server.start(IngestService(store).handle)
    device = f"v3{uuid.uuid4().hex[:8]}"
    up = MqttUplink(msgspec.structs.replace(cfg, protocol=device_proto), device_id=device)
    try:
        for batch_id, payload, seqs in plan_batches(device, 3):
            ack = await up.send(payload, batch_id=batch_id, timeout=5)
            assert ack.batch_id == batch_id and ack.accepted == len(seqs)
    finally:
        await up.close()
        await server.stop()
    assert await store.count(device) == 60


async def test_persistent_session_delivers_ack_after_reconnect(
        mosquitto: tuple[str, int], store: RecordingStore) -> None:
    """An ack published while the device was away reaches it when it reconnects."""
    cfg = _cfg(mosquitto)
    service = IngestService(store)
    gate = asyncio.Event()

    committed = asyncio.Event()

    async def slow(inc: Incoming) -> Ack:
        await gate.wait()
        ack = await service.handle(inc)
        committed.set()
        return ack

    server = MqttIngestServer(cfg)
    await server.start(slow)
    device = f"ps{uuid.uuid4().hex[:8]}"
    up = MqttUplink(cfg, device_id=device)
    try:
        batch_id, payload, _ = make_batch(device, 0)
        with pytest.raises(TransportError):
            await up.send(payload, batch_id=batch_id, timeout=0.5)  # drops the connection
        gate.set()
        await asyncio.wait_for(committed.wait(), 5)  # committed while the device is away
        await asyncio.sleep(0.2)  # ... and its ack is published into the session
        assert await store.count(device) == 20
        batch_id, payload, _ = make_batch(device, 1)
        ack = await up.send(payload, batch_id=batch_id, timeout=5)  # reconnects
        assert ack.status == "ok"
        assert up.stale_acks == 1  # the queued ack of batch 0 arrived with the session
    finally:
        await up.close()
        await server.stop()


async def test_puback_only_mode(mosquitto: tuple[str, int]) -> None:
    cfg = _cfg(mosquitto, end_to_end=False)
    up = MqttUplink(cfg, device_id=f"pa{uuid.uuid4().hex[:8]}")
    assert up.end_to_end is False
    batch_id, payload, _ = make_batch("x", 0)
    ack = await up.send(payload, batch_id=batch_id, timeout=5)  # no ingest: PUBACK only
    await up.close()
    assert ack.status == "ok" and ack.reason == "transport" and ack.accepted == 0


async def test_rejected_batch_is_payload_rejected(mosquitto: tuple[str, int],
                                                  store: RecordingStore) -> None:
    cfg = _cfg(mosquitto)
    server = MqttIngestServer(cfg)
    service = IngestService(store)
    await server.start(service.handle)
    device = f"rj{uuid.uuid4().hex[:8]}"
    up = MqttUplink(cfg, device_id=device)
    try:
        with pytest.raises(PayloadRejected) as ei:  # correlation data routes even garbage
            await up.send(b"garbage" * 20, batch_id="b-1", timeout=5)
        assert not ei.value.retriable
        # a batch claiming another device on this device's topic
        batch_id, payload, _ = make_batch("someone-else", 0)
        with pytest.raises(PayloadRejected) as ei:
            await up.send(payload, batch_id=batch_id, timeout=5)
        assert ei.value.reason == "device_mismatch"
    finally:
        await up.close()
        await server.stop()
    assert await store.count() == 0


async def test_dead_broker_is_retriable_transport_error() -> None:
    cfg = MqttConfig(port=free_port(), connect_timeout_s=1.0)
    up = MqttUplink(cfg, device_id="nobody")
    with pytest.raises(TransportError) as ei:
        await up.send(b"x", batch_id="b", timeout=1)
    assert ei.value.retriable
    server = MqttIngestServer(cfg)
    with pytest.raises(TransportError):
        await server.start(IngestService(None).handle)  # type: ignore[arg-type]
    await up.close()


async def test_ingest_resubscribes_after_losing_the_broker(mosquitto: tuple[str, int],
                                                           store: RecordingStore) -> None:
    from simulators.netproxy import FaultProxy

    cfg = _cfg(mosquitto)
    async with FaultProxy(mosquitto) as proxy:
        server = MqttIngestServer(msgspec.structs.replace(cfg, port=proxy.port()),
                                  reconnect_max_s=0.2)
        await server.start(IngestService(store).handle)
        device = f"rc{uuid.uuid4().hex[:8]}"
        up = MqttUplink(cfg, device_id=device)  # the device talks to the broker directly
        try:
            batches = plan_batches(device, 2)
            await up.send(batches[0][1], batch_id=batches[0][0], timeout=5)
            proxy.cut(mode="reset")
            await asyncio.sleep(0.3)  # the ingest notices and retries, refused meanwhile
            proxy.restore()
            await server.wait_ready(5)
            ack = await send_until_acked(up, batches[1][0], batches[1][1], timeout=2)
            assert ack.status == "ok"
            assert proxy.counters().connections >= 2
        finally:
            await up.close()
            await server.stop()
    assert await store.count(device) == 40
