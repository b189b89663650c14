"""An in-process uplink that hands batches straight to the real cloud IngestService."""

from __future__ import annotations

from cloud.ingest import IngestService
from pymigrate.errors import PayloadRejected, ThrottledError, TransportError
from pymigrate.types import Ack
from transports.base import Incoming


class LoopbackUplink:
    """Real ingest code, no network. ``down = True`` makes sends fail (an outage)."""

    name = "loopback"
    end_to_end = True

    def __init__(self, service: IngestService, device_id: str, *,
                 max_payload: int = 256 * 1024) -> None:
        self.service = service
        self.device_id = device_id
        self.max_payload = max_payload
        self.down = False
        self.sent = 0

    async def connect(self) -> None:
        if self.down:
            raise TransportError("loopback down")

    async def send(self, payload: bytes, *, batch_id: str, timeout: float) -> Ack:  # noqa: ASYNC109
        if self.down:
            raise TransportError("loopback down")
        self.sent += 1
        ack = await self.service.handle(Incoming(payload, "loopback", self.device_id))
        if ack.status == "throttled":
            raise ThrottledError(retry_after_s=ack.retry_after_s)
        if ack.status == "rejected":
            raise PayloadRejected(ack.reason, reason=ack.reason, ack=ack)
        if ack.status not in ("ok", "duplicate"):
            raise TransportError(f"ingest answered {ack.status}")
        return ack

    async def close(self) -> None:
        return None
