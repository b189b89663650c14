"""Hostile input on every protocol: the cloud ingest (MQTT, CoAP, AMQP listeners on real
brokers / a real CoAP server) answers garbage, truncated and oversized payloads and batches
that claim another device with a typed rejection (:class:`PayloadRejected` on the device,
a ``rejected:<reason>`` counter on the service), stores nothing of them, and keeps serving.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from cloud.ingest import IngestService
from pymigrate.errors import PayloadRejected, PyMigrateError
from tests.conftest import free_port, require_service
from tests.integration.transport_support import RecordingStore, make_batch
from transports.base import IngestServer, Uplink
from transports.config import AmqpConfig, CoapConfig, MqttConfig, TransportConfig
from transports.registry import build_ingest_server, build_uplink

pytestmark = pytest.mark.integration

MAX_BATCH = 4096  # the ingest's limit in these tests; a 1500-reading batch is over it


@dataclass
class Rig:
    kind: str
    store: RecordingStore
    service: IngestService
    server: IngestServer
    cfg: TransportConfig

    def uplink(self, device: str) -> Uplink:
        return build_uplink(self.cfg, device)


@pytest.fixture(params=["mqtt", "coap", "amqp"])
async def rig(request: pytest.FixtureRequest, tmp_path: object) -> AsyncIterator[Rig]:
    kind = request.param
    uniq = uuid.uuid4().hex[:10]
    cfg: TransportConfig
    if kind == "mqtt":
        require_service("Mosquitto", "127.0.0.1", 1883)
        cfg = MqttConfig(prefix=f"sectest/{uniq}", share_group=f"g{uniq}",
                         connect_timeout_s=3.0)
    elif kind == "amqp":
        require_service("RabbitMQ", "127.0.0.1", 5672)
        cfg = AmqpConfig(exchange=f"sectest.{uniq}", queue=f"sectest.{uniq}.ingest",
                         connect_timeout_s=3.0)
    else:
        cfg = CoapConfig(port=free_port(socket.SOCK_DGRAM), ack_timeout_s=0.5)
    store = RecordingStore(f"{tmp_path}/store.db")
    await store.open()
    service = IngestService(store, max_batch_bytes=MAX_BATCH)
    server = build_ingest_server(cfg)
    await server.start(service.handle)
    try:
        yield Rig(kind, store, service, server, cfg)
    finally:
        if hasattr(server, "delete_topology"):
            await server.delete_topology()
        await server.stop()
        await store.close()


async def _rejected(up: Uplink, payload: bytes, batch_id: str) -> PayloadRejected:
    with pytest.raises(PayloadRejected) as ei:
        await up.send(payload, batch_id=batch_id, timeout=5.0)
    assert isinstance(ei.value, PyMigrateError) and ei.value.retriable is False
    return ei.value


async def test_malformed_payloads_rejected_typed(rig: Rig) -> None:
    dev = f"sec-{rig.kind}-1"
    up = rig.uplink(dev)
    try:
        bid, good, seqs = make_batch(dev, 0)
        cases = {
            "garbage": (os.urandom(300), "bad_magic"),
            "truncated": (good[: len(good) // 2], "truncated"),
            "bitflip": (good[:-3] + bytes([good[-3] ^ 0xFF]) + good[-2:], None),
            "oversized": (make_batch(dev, 1, per_batch=1500)[1], "oversized"),
            "empty": (b"", "truncated"),
        }
        assert len(cases["oversized"][0]) > MAX_BATCH
        for name, (payload, reason) in cases.items():
            exc = await _rejected(up, payload, f"{dev}-{name}")
            if reason is not None:
                assert exc.reason == reason, (name, exc.reason)
                assert rig.service.counters[f"rejected:{reason}"] >= 1
        assert await rig.store.count(dev) == 0  # nothing of them was written
        # and the ingest still serves: the genuine batch is stored
        ack = await up.send(good, batch_id=bid, timeout=5.0)
        assert ack.status == "ok" and ack.accepted == len(seqs)
        assert await rig.store.count(dev) == len(seqs)
    finally:
        await up.close()


async def test_device_mismatch_refused_and_counted(rig: Rig) -> None:
    """A batch claiming device B sent on device A's channel (topic / path / routing key)."""
    me, victim = f"sec-{rig.kind}-me", f"sec-{rig.kind}-victim"
    up = rig.uplink(me)
    try:
        bid, forged, _ = make_batch(victim, 0)
        exc = await _rejected(up, forged, bid)
        assert exc.reason == "device_mismatch"
        assert rig.service.counters["rejected:device_mismatch"] == 1
        assert await rig.store.count(victim) == 0
        assert await rig.store.count(me) == 0
    finally:
        await up.close()


async def test_regression_ingest_zstd_bomb_rejected(tmp_path: object) -> None:
    import zlib

    from pymigrate.envelope import Batch, encode_batch
    from pymigrate.types import Chunk, Priority
    from transports.base import Incoming

    bomb = b"(\xb5/\xfd\xe0" + (1 << 40).to_bytes(8, "little") + b"\x01\x00\x00"
    chunk = Chunk(device_id="bomb", priority=Priority.NORMAL, seq_first=1, seq_last=1,
                  count=1, ts_first=0, ts_last=0, codec=1, payload=bomb,
                  checksum=zlib.crc32(bomb))
    store = RecordingStore(f"{tmp_path}/bomb.db")
    await store.open()
    try:
        service = IngestService(store)
        ack = await service.handle(Incoming(encode_batch(Batch("bomb", "b1", [chunk], 0)),
                                            "mqtt", "bomb"))
        assert ack.status == "rejected"
    finally:
        await store.close()
