"""CoAP error paths against an in-process aiocoap ingest: rejection, handler failure,
store failure, no server, port in use."""

from __future__ import annotations

import socket
import uuid

import pytest

from pymigrate.errors import PayloadRejected, TransportError
from pymigrate.types import Ack
from tests.conftest import free_port
from tests.integration import transport_support
from tests.integration.transport_support import make_batch
from transports.base import Incoming
from transports.coap import CoapIngestServer, CoapUplink

pytestmark = pytest.mark.integration
fresh_structlog = transport_support.fresh_structlog  # autouse: see its docstring


async def _serve(handler: object) -> tuple[CoapIngestServer, int]:
    port = free_port(socket.SOCK_DGRAM)
    server = CoapIngestServer("127.0.0.1", port)
    await server.start(handler)  # type: ignore[arg-type]
    return server, port


async def test_rejections_and_failures_are_typed() -> None:
    mode = {"v": "reject"}

    async def handler(inc: Incoming) -> Ack:
        if mode["v"] == "boom":
            raise RuntimeError("handler bug")
        status = "rejected" if mode["v"] == "reject" else "error"
        return Ack("b", status, 1, 2, reason="decode" if status == "rejected" else "store")

    server, port = await _serve(handler)
    up = CoapUplink(f"coap://127.0.0.1:{port}/ingest", device_id=f"e{uuid.uuid4().hex[:6]}")
    batch_id, payload, _ = make_batch("x", 0)
    try:
        with pytest.raises(PayloadRejected) as ei:
            await up.send(payload, batch_id=batch_id, timeout=3)
        assert ei.value.reason == "decode" and not ei.value.retriable
        mode["v"] = "error"  # store outage: 5.00 with an Ack -> retriable
        with pytest.raises(TransportError) as te:
            await up.send(payload, batch_id=batch_id, timeout=3)
        assert te.value.retriable
        mode["v"] = "boom"  # a handler bug answers 5.00 without an Ack
        with pytest.raises(TransportError) as te:
            await up.send(payload, batch_id=batch_id, timeout=3)
        assert te.value.retriable
    finally:
        await up.close()
        await server.stop()


async def test_no_server_is_retriable_and_port_in_use_is_not() -> None:
    port = free_port(socket.SOCK_DGRAM)
    up = CoapUplink(f"coap://127.0.0.1:{port}/ingest", device_id="d", ack_timeout_s=0.1)
    with pytest.raises(TransportError) as ei:
        await up.send(b"x" * 10, batch_id="b", timeout=1.0)
    assert ei.value.retriable
    await up.close()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        busy = s.getsockname()[1]
        server = CoapIngestServer("127.0.0.1", busy)
        with pytest.raises(TransportError) as ei:
            await server.start(lambda inc: None)  # type: ignore[arg-type,return-value]
        assert not ei.value.retriable
