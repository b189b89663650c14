"""One contract, three transports: every batch sent through a faulty network arrives in the
cloud store exactly once, in seq order per device, and is acked.

Real Mosquitto (1883) and RabbitMQ (5672) and an aiocoap ingest, each behind the
fault-injecting proxy (TCP for MQTT/AMQP, UDP for CoAP). The device loop retries on
TransportError like the uploader does; the store must still hold each reading once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import uuid
from collections.abc import AsyncIterator, Callable

import msgspec
import pytest

from cloud.ingest import IngestService
from pymigrate.errors import ThrottledError, TransportError
from simulators.netproxy import FaultProxy, UdpFaultProxy
from tests.conftest import free_port, require_service
from tests.integration import transport_support
from tests.integration.transport_support import (
    RecordingStore,
    make_batch,
    plan_batches,
    send_until_acked,
)
from transports.base import IngestServer, Uplink
from transports.config import AmqpConfig, CoapConfig, MqttConfig
from transports.registry import build_ingest_server, build_uplink

pytestmark = pytest.mark.integration
fresh_structlog = transport_support.fresh_structlog  # autouse: see its docstring


@dataclasses.dataclass
class Rig:
    kind: str
    proxy: FaultProxy | UdpFaultProxy
    store: RecordingStore
    service: IngestService
    server: IngestServer
    uplink: Callable[[str], Uplink]


@pytest.fixture(params=["mqtt", "coap", "amqp"])
async def rig(request: pytest.FixtureRequest, tmp_path: object) -> AsyncIterator[Rig]:
    kind = request.param
    uniq = uuid.uuid4().hex[:10]
    store = RecordingStore(f"{tmp_path}/store.db")
    await store.open()
    service = IngestService(store)
    proxy: FaultProxy | UdpFaultProxy
    if kind == "mqtt":
        require_service("Mosquitto", "127.0.0.1", 1883)
        mcfg = MqttConfig(prefix=f"pmtest/{uniq}", share_group=f"g{uniq}", keepalive_s=5,
                          connect_timeout_s=2.0)
        server = build_ingest_server(mcfg)
        proxy = FaultProxy(("127.0.0.1", 1883))
        await proxy.start()
        dev_cfg: MqttConfig | CoapConfig | AmqpConfig = msgspec.structs.replace(
            mcfg, port=proxy.port())
    elif kind == "amqp":
        require_service("RabbitMQ", "127.0.0.1", 5672)
        acfg = AmqpConfig(exchange=f"pmtest.{uniq}", queue=f"pmtest.{uniq}.ingest",
                          connect_timeout_s=2.0)
        server = build_ingest_server(acfg)
        proxy = FaultProxy(("127.0.0.1", 5672))
        await proxy.start()
        dev_cfg = msgspec.structs.replace(acfg, port=proxy.port())
    else:
        port = free_port(socket.SOCK_DGRAM)
        ccfg = CoapConfig(port=port, ack_timeout_s=0.3)
        server = build_ingest_server(ccfg)
        proxy = UdpFaultProxy(("127.0.0.1", port))
        await proxy.start()
        dev_cfg = msgspec.structs.replace(ccfg, port=proxy.port())
    await server.start(service.handle)
    try:
        yield Rig(kind, proxy, store, service, server,
                  lambda device: build_uplink(dev_cfg, device))
    finally:
        await proxy.close()
        if hasattr(server, "delete_topology"):
            await server.delete_topology()
        await server.stop()
        await store.close()


async def _device(rig: Rig, device: str, batches: int, *, big_every: int = 0,
                  timeout: float = 2.0) -> tuple[list[str], list[str]]:  # noqa: ASYNC109
    """Send ``batches`` batches one after another; return (acked batch ids, errors seen)."""
    up = rig.uplink(device)
    acked: list[str] = []
    errors: list[str] = []
    try:
        for batch_id, payload, _ in plan_batches(device, batches, big_every=big_every):
            ack = await send_until_acked(up, batch_id, payload, timeout=timeout, errors=errors)
            assert ack.status in ("ok", "duplicate")
            assert ack.batch_id == batch_id
            acked.append(batch_id)
    finally:
        await up.close()
    return acked, errors


async def _assert_exactly_once_in_order(rig: Rig, devices: dict[str, int],
                                        big_every: int = 0) -> None:
    for device, n in devices.items():
        expected = [s for _, _, seqs in plan_batches(device, n, big_every=big_every)
                    for s in seqs]
        # exactly once: the store holds each seq once (count) and nothing else
        assert await rig.store.count(device) == len(expected)
        stored = sorted(r.seq for r in await rig.store.query(device))
        assert stored == sorted(expected)
        # in order: the writes that stored something came in seq order (a chunk is
        # columnar per series, so order within one write is by sensor, not seq)
        written = [seq for w in rig.store.writes[device] for seq in sorted(w)]
        assert written == expected


async def test_contract_clean_link(rig: Rig) -> None:
    """No faults: acks are end-to-end and a resent batch is answered ``duplicate``."""
    devices = {f"d{uuid.uuid4().hex[:8]}": 8 for _ in range(2)}
    results = await asyncio.gather(*(_device(rig, d, n) for d, n in devices.items()))
    for acked, errors in results:
        assert len(acked) == 8 and errors == []
    await _assert_exactly_once_in_order(rig, devices)
    device = next(iter(devices))
    up = rig.uplink(device)
    batch_id, payload, _ = make_batch(device, 3)
    ack = await up.send(payload, batch_id=batch_id, timeout=5)
    await up.close()
    assert ack.status == "duplicate" and ack.duplicates == 20 and ack.accepted == 0
    assert rig.proxy.counters().bytes_up > 0 and rig.proxy.counters().bytes_down > 0


async def test_contract_under_faults(rig: Rig) -> None:
    """Latency, jitter, loss/stalls, resets and a short outage: still exactly once, in order."""
    if rig.kind == "coap":
        rig.proxy.set(latency_ms=5, jitter_ms=10, loss=0.05)
    else:
        rig.proxy.set(latency_ms=5, jitter_ms=10, loss=0.05, stall_ms=100, reset_prob=0.03)
    rig.proxy.schedule_outage(0.3, 0.6, mode="reset")
    rig.proxy.schedule_outage(1.5, 0.5, mode="blackhole")
    devices = {f"f{uuid.uuid4().hex[:8]}": 12 for _ in range(2)}
    results = await asyncio.gather(*(_device(rig, d, n, big_every=5, timeout=1.5)
                                     for d, n in devices.items()))
    for acked, _ in results:
        assert len(acked) == 12
    await _assert_exactly_once_in_order(rig, devices, big_every=5)
    c = rig.proxy.counters()
    # the faults really happened (else this test proves nothing)
    assert c.dropped + c.resets + c.stalled > 0, c
    errors = [e for _, errs in results for e in errs]
    print(rig.kind, "errors seen:", len(errors), "counters:", c)


async def test_contract_throttled(rig: Rig) -> None:
    """The ingest's rate limit reaches the device as ThrottledError with a retry-after."""

    class Limiter:
        def check(self, device_id: str) -> None:
            raise ThrottledError(retry_after_s=7.0)

    rig.service.limiter = Limiter()
    device = f"t{uuid.uuid4().hex[:8]}"
    up = rig.uplink(device)
    batch_id, payload, _ = make_batch(device, 0)
    with pytest.raises(ThrottledError) as ei:
        await up.send(payload, batch_id=batch_id, timeout=5)
    await up.close()
    assert ei.value.retry_after_s == pytest.approx(7.0)
    assert await rig.store.count(device) == 0


async def test_contract_partition_then_heal(rig: Rig) -> None:
    """A cut link is a retriable TransportError, not a hang; after restore the batch lands."""
    device = f"p{uuid.uuid4().hex[:8]}"
    up = rig.uplink(device)
    batch_id, payload, _ = make_batch(device, 0)
    await up.send(payload, batch_id=batch_id, timeout=5)
    rig.proxy.cut(mode="blackhole")
    batch_id, payload, _ = make_batch(device, 1)
    with pytest.raises(TransportError) as ei:
        await up.send(payload, batch_id=batch_id, timeout=1.0)
    assert ei.value.retriable
    rig.proxy.restore()
    ack = await send_until_acked(up, batch_id, payload, timeout=2.0, deadline_s=20)
    await up.close()
    assert ack.status in ("ok", "duplicate")
    assert await rig.store.count(device) == 40
