"""AMQP specifics against the real RabbitMQ: mandatory routing, competing consumers,
broker nack as throttling, confirm-only mode, user_id identity, dead broker."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from cloud.ingest import IngestService
from pymigrate.errors import PayloadRejected, ThrottledError, TransportError
from pymigrate.types import Ack
from tests.conftest import free_port
from tests.integration import transport_support
from tests.integration.transport_support import RecordingStore, make_batch, plan_batches
from transports.amqp import AmqpIngestServer, AmqpUplink
from transports.base import Incoming
from transports.config import AmqpConfig

pytestmark = pytest.mark.integration
fresh_structlog = transport_support.fresh_structlog  # autouse: see its docstring


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[RecordingStore]:
    s = RecordingStore(tmp_path / "s.db")
    await s.open()
    yield s
    await s.close()


def _cfg(**kw: object) -> AmqpConfig:
    u = uuid.uuid4().hex[:10]
    base = AmqpConfig(exchange=f"pmtest.{u}", queue=f"pmtest.{u}.ingest", connect_timeout_s=3.0)
    return msgspec.structs.replace(base, **kw)


async def _stop(*servers: AmqpIngestServer) -> None:
    await servers[0].delete_topology()
    for s in servers:
        await s.stop()


async def test_unroutable_is_an_error_not_a_loss(rabbitmq: str) -> None:
    cfg = _cfg()
    up = AmqpUplink(cfg, device_id="lonely")  # exchange exists, no queue bound yet
    batch_id, payload, _ = make_batch("lonely", 0)
    try:
        with pytest.raises(TransportError) as ei:
            await up.send(payload, batch_id=batch_id, timeout=3)
        assert ei.value.reason == "unroutable" and ei.value.retriable
    finally:
        await up.close()
        server = AmqpIngestServer(cfg)  # only to clean the exchange up
        await server.start(IngestService(None).handle)  # type: ignore[arg-type]
        await _stop(server)


async def test_competing_consumers_split_the_load(rabbitmq: str,
                                                  store: RecordingStore) -> None:
    cfg = _cfg(prefetch=4)
    service = IngestService(store)
    replicas = [AmqpIngestServer(cfg) for _ in range(2)]
    for r in replicas:
        await r.start(service.handle)
    devices = [f"cc{uuid.uuid4().hex[:8]}" for _ in range(4)]

    async def run(device: str) -> None:
        up = AmqpUplink(cfg, device_id=device)
        for batch_id, payload, _ in plan_batches(device, 10):
            ack = await up.send(payload, batch_id=batch_id, timeout=5)
            assert ack.status == "ok"
        await up.close()

    try:
        await asyncio.gather(*(run(d) for d in devices))
    finally:
        await _stop(*replicas)
    assert sum(r.handled for r in replicas) == 40
    assert all(r.handled > 0 for r in replicas), [r.handled for r in replicas]
    for d in devices:
        assert await store.count(d) == 200


async def test_full_queue_nacks_as_throttling(rabbitmq: str, store: RecordingStore) -> None:
    """``max_queue_length`` + reject-publish: a broker nack reaches the device as
    ThrottledError carrying ``throttle_retry_after_s``."""
    cfg = _cfg(max_queue_length=1, prefetch=1, end_to_end=False, throttle_retry_after_s=3.0)
    gate = asyncio.Event()
    service = IngestService(store)

    async def stuck(inc: Incoming) -> Ack:
        await gate.wait()
        return await service.handle(inc)

    server = AmqpIngestServer(cfg)
    await server.start(stuck)
    device = f"nk{uuid.uuid4().hex[:8]}"
    up = AmqpUplink(cfg, device_id=device)
    throttled: ThrottledError | None = None
    try:
        for batch_id, payload, _ in plan_batches(device, 5):
            try:
                ack = await up.send(payload, batch_id=batch_id, timeout=3)
                assert ack.reason == "transport"  # confirm-only mode
            except ThrottledError as exc:
                throttled = exc
                # a nacking channel is not reused (a quorum queue that lost its leader can
                # leave a channel the broker nacks forever): the next send opens a new one
                assert up._link is None
                break
    finally:
        gate.set()
        await up.close()
        await asyncio.sleep(0.2)
        await _stop(server)
    assert throttled is not None and throttled.retry_after_s == 3.0


async def test_user_id_identity(rabbitmq: str, store: RecordingStore) -> None:
    """With ``identity = "user_id"`` the broker-validated user is the channel identity:
    a device named after its login is accepted, another name is refused."""
    cfg = _cfg(identity="user_id")
    server = AmqpIngestServer(cfg)
    await server.start(IngestService(store).handle)
    try:
        up = AmqpUplink(cfg, device_id="guest")
        batch_id, payload, _ = make_batch("guest", 0)
        ack = await up.send(payload, batch_id=batch_id, timeout=5)
        await up.close()
        assert ack.status in ("ok", "duplicate")
        impostor = AmqpUplink(cfg, device_id="dev-9")
        batch_id, payload, _ = make_batch("dev-9", 0)
        with pytest.raises(PayloadRejected) as ei:
            await impostor.send(payload, batch_id=batch_id, timeout=5)
        await impostor.close()
        assert ei.value.reason == "device_mismatch"
    finally:
        await _stop(server)


async def test_a_message_without_the_identity_is_refused(rabbitmq: str,
                                                         store: RecordingStore) -> None:
    """With ``identity = "user_id"`` a publisher that sets no user_id vouches for nobody:
    its batch is refused as a device mismatch (dead-lettered with the peer), never
    stored under the device id it claims."""
    import aio_pika

    cfg = _cfg(identity="user_id")
    server = AmqpIngestServer(cfg)
    svc = IngestService(store)
    await server.start(svc.handle)
    conn = await aio_pika.connect_robust(rabbitmq, timeout=5)
    try:
        ch = await conn.channel()
        replies = await ch.declare_queue("", exclusive=True, auto_delete=True)
        ex = await ch.get_exchange(cfg.exchange)
        batch_id, payload, _ = make_batch("dev-7", 0)
        await ex.publish(aio_pika.Message(payload, correlation_id=batch_id,
                                          reply_to=replies.name),
                         routing_key=f"{cfg.routing_prefix}.dev-7")
        msg = await replies.get(timeout=5, fail=False)
        for _ in range(50):
            if msg is not None:
                break
            await asyncio.sleep(0.1)
            msg = await replies.get(timeout=5, fail=False)
        assert msg is not None, "no answer from the ingest"
        ack = msgspec.json.decode(msg.body, type=Ack)
        assert (ack.status, ack.reason) == ("rejected", "device_mismatch")
        assert await store.count("dev-7") == 0
        assert svc.counters["rejected:device_mismatch"] == 1
    finally:
        await conn.close()
        await _stop(server)


async def test_dead_broker_and_bad_login() -> None:
    up = AmqpUplink(_cfg(port=free_port(), connect_timeout_s=1.0), device_id="d")
    with pytest.raises(TransportError) as ei:
        await up.send(b"x", batch_id="b", timeout=2)
    assert ei.value.retriable
    await up.close()
    server = AmqpIngestServer(_cfg(port=free_port(), connect_timeout_s=1.0))
    with pytest.raises(TransportError):
        await server.start(IngestService(None).handle)  # type: ignore[arg-type]


async def test_bad_login_is_not_retriable(rabbitmq: str) -> None:
    up = AmqpUplink(_cfg(password="wrong-password"), device_id="d")
    with pytest.raises(TransportError) as ei:
        await up.connect()
    await up.close()
    assert ei.value.retriable is False and ei.value.reason == "auth"


async def test_queue_of_another_type_is_a_config_error(rabbitmq: str) -> None:
    """An existing classic queue cannot be redeclared as a quorum queue: the ingest says
    which setting to change instead of retrying forever."""
    classic = _cfg(queue_type="classic")
    server = AmqpIngestServer(classic)
    await server.start(IngestService(None).handle)  # type: ignore[arg-type]
    try:
        quorum = msgspec.structs.replace(classic, queue_type="quorum")
        with pytest.raises(TransportError) as ei:
            await AmqpIngestServer(quorum).start(IngestService(None).handle)  # type: ignore[arg-type]
        assert not ei.value.retriable and ei.value.reason == "config"
        assert "cloud.amqp.queue_type" in str(ei.value)
    finally:
        await _stop(server)


async def test_auto_uses_an_existing_queue_as_it_is(rabbitmq: str, store: RecordingStore) -> None:
    """``queue_type = "auto"`` (default): a classic queue made by an earlier version is
    consumed as it is; a queue that does not exist yet is created as a quorum queue."""
    classic = _cfg(queue_type="classic")
    old = AmqpIngestServer(classic)
    await old.start(IngestService(store).handle)
    await old.stop()
    auto = AmqpIngestServer(msgspec.structs.replace(classic, queue_type="auto"))
    await auto.start(IngestService(store).handle)
    device = f"au{uuid.uuid4().hex[:8]}"
    up = AmqpUplink(classic, device_id=device)
    try:
        batch_id, payload, _ = make_batch(device, 0)
        assert (await up.send(payload, batch_id=batch_id, timeout=5)).status == "ok"
    finally:
        await up.close()
        await _stop(auto)
    fresh = AmqpIngestServer(_cfg())  # auto, new queue
    await fresh.start(IngestService(store).handle)
    try:
        assert fresh._queue_args() == {"x-queue-type": "quorum"}
        strict = AmqpIngestServer(msgspec.structs.replace(fresh.cfg, queue_type="quorum"))
        await strict.start(IngestService(store).handle)  # it is a quorum queue: accepted
        await strict.stop()
    finally:
        await _stop(fresh)
