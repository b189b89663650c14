"""Helpers for the cloud ingest and store tests: readings, wire payloads, a store that
can be told to fail (an outage), a clock whose sleeps return at once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from agent.codec import seal_chunk
from cloud.dedup import IdempotencyState
from cloud.stores.base import Admit, StoreUnavailable, WriteResult
from pymigrate.envelope import Batch, encode_batch
from pymigrate.types import Reading
from transports.base import Incoming

T0 = 1_767_225_600_000


def make_readings(device: str, n: int, *, seq0: int = 1, sensors: int = 3, t0: int = T0,
                  step_ms: int = 1000) -> list[Reading]:
    """``n`` readings with seqs ``seq0..seq0+n-1``, round-robin over ``sensors`` sensors,
    each sensor's readings ``step_ms`` apart (distinct series+instant per reading)."""
    return [Reading(device, f"s{(seq0 + i) % sensors}", t0 + ((seq0 + i) // sensors) * step_ms,
                    float((seq0 + i) % 97) + 0.25, seq=seq0 + i) for i in range(n)]


def payload(device: str, rs: Sequence[Reading], batch_id: str = "b", *,
            chunk: int = 500) -> bytes:
    """The wire envelope of readings (sealed in chunks of ``chunk``)."""
    chunks = [seal_chunk(list(rs[i:i + chunk])) for i in range(0, len(rs), chunk)]
    return encode_batch(Batch(device, batch_id, chunks))


def incoming(data: bytes, device: str | None = None) -> Incoming:
    return Incoming(payload=data, transport="test", channel_device_id=device)


class FlakyStore:
    """Wraps a store; while ``down`` every write raises (an outage) and nothing is stored."""

    def __init__(self, inner: Any, exc: Exception | None = None) -> None:
        self.inner = inner
        self.name = inner.name
        self.down = False
        self.exc = exc or StoreUnavailable("store is down")

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def write(self, device_id: str, batch_id: str, readings: Sequence[Reading],
                    *, admit: Admit | None = None, meta: Any = None) -> WriteResult:
        if self.down:
            raise self.exc
        result: WriteResult = await self.inner.write(device_id, batch_id, readings, admit=admit,
                                                     meta=meta)
        return result

    async def dead_letter(self, device_id: str, batch_id: str, reason: str,
                          payload: bytes, *, peer: str = "") -> None:
        if self.down:
            raise self.exc
        await self.inner.dead_letter(device_id, batch_id, reason, payload, peer=peer)

    async def query(self, device_id: str, sensor: str | None = None,
                    start_ms: int | None = None, end_ms: int | None = None) -> list[Reading]:
        result: list[Reading] = await self.inner.query(device_id, sensor, start_ms, end_ms)
        return result

    async def count(self, device_id: str | None = None) -> int:
        return int(await self.inner.count(device_id))

    async def dead_letters(self, limit: int = 100) -> list[tuple[str, str, str]]:
        result: list[tuple[str, str, str]] = await self.inner.dead_letters(limit)
        return result

    async def idempotency_state(self, device_id: str) -> IdempotencyState:
        result: IdempotencyState = await self.inner.idempotency_state(device_id)
        return result


class InstantClock:
    """Wall time, but ``sleep`` only records the duration (retry backoff in tests)."""

    def __init__(self) -> None:
        self.slept: list[float] = []

    def time_ms(self) -> int:
        return T0

    def monotonic(self) -> float:
        return 0.0

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)

    async def sleep_until(self, deadline: float) -> None:
        self.slept.append(deadline)


def stream_payload(device: str, rs: Sequence[Reading], batch_id: str, *,
                   instance: str = "a" * 16, gaps: Sequence[Any] = (), hwm: int = 0,
                   chunk: int = 50) -> bytes:
    """An envelope v4 of one agent instance (stream), with gap records."""
    chunks = [seal_chunk(list(rs[i:i + chunk])) for i in range(0, len(rs), chunk)]
    top = max([hwm, *(r.seq for r in rs)], default=hwm)
    return encode_batch(Batch(device, batch_id, chunks, 1, instance, 1, top, list(gaps)))
