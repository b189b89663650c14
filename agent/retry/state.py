"""Per-destination retry state and the batch in flight, plus the buffer protocol the
uploader needs (``agent.buffer.DurableBuffer`` satisfies it; so does
``simulators.membuffer.MemoryBuffer``)."""

from __future__ import annotations

import asyncio
import collections
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from agent.retry.backoff import Backoff
from agent.retry.breaker import CircuitBreaker
from pymigrate.types import Ack, Chunk, Priority
from transports.base import Uplink

__all__ = ["AckCallback", "ClockFix", "DeadLetterCallback", "Destination", "EventCallback",
           "PendingBatch", "StoredChunkLike", "UploadBuffer"]


class StoredChunkLike(Protocol):
    """What the durable buffer hands out (``agent.buffer.StoredChunk``)."""

    @property
    def id(self) -> int: ...
    @property
    def chunk(self) -> Chunk: ...
    @property
    def attempts(self) -> int: ...
    @property
    def created_ms(self) -> int: ...


class UploadBuffer(Protocol):
    """The part of the durable buffer the uploader uses."""

    async def take(self, max_bytes: int, max_chunks: int = 64,
                   min_priority: Priority = Priority.LOW) -> Sequence[StoredChunkLike]: ...

    async def ack(self, ids: Sequence[int], gap_ids: Sequence[int] = ()) -> Any: ...

    async def release(self, ids: Sequence[int], *, failed: bool = True,
                      gap_ids: Sequence[int] = ()) -> Any: ...

    async def wait_for_data(self, min_priority: Priority = Priority.LOW) -> Any: ...


class ClockFix(Protocol):
    """Readings stamped without a clock model (``agent.clockjournal.ClockJournal``):
    held until a model exists, then sent with mapped times."""

    def holding(self) -> bool: ...

    def answered_without_sample(self) -> None: ...

    async def restamp(self, items: list[StoredChunkLike],
                      refused: set[int] | frozenset[int] = frozenset()
                      ) -> list[StoredChunkLike]: ...


AckCallback = Callable[[Ack, float, float], None]
EventCallback = Callable[[str, dict[str, Any]], None]
DeadLetterCallback = Callable[[Sequence[StoredChunkLike], str], Awaitable[None] | None]


class Destination:
    """One destination: its uplink, breaker, backoff and deadlines."""

    def __init__(self, uplink: Uplink, breaker: CircuitBreaker, backoff: Backoff) -> None:
        self.uplink = uplink
        self.name = uplink.name
        self.breaker = breaker
        self.backoff = backoff
        self.retry_at = 0.0  # monotonic: after a failure, not before
        self.throttle_until = 0.0  # monotonic: the cloud asked us to wait
        self.throttle_hold_until = 0.0  # no growth of batches in flight before this
        # learnt pacing under a quota: at least pace_s between sends; it grows on each
        # throttle and decays on each unthrottled ack (AIMD on the send rate)
        self.pace_s = 0.0
        self.last_send_at = -math.inf
        self.connected = False
        self.failures_in_row = 0
        self.lock = asyncio.Lock()
        self.counts: collections.Counter[str] = collections.Counter()


class PendingBatch:
    """A batch being sent: its stored chunks, attempt number and encoded payload."""

    __slots__ = ("attempt", "batch_id", "dead_letter", "gap_ids", "items", "payload", "probe")

    def __init__(self, items: list[StoredChunkLike], attempt: int, batch_id: str,
                 payload: bytes, probe: bool, gap_ids: Sequence[int] = (),
                 dead_letter: str = "") -> None:
        self.items = items
        self.attempt = attempt
        self.batch_id = batch_id
        self.payload = payload
        self.probe = probe
        self.gap_ids = list(gap_ids)  # gap records the batch carries (ack/release with it)
        self.dead_letter = dead_letter  # the cloud is asked to keep the chunks as dead letters

    @property
    def ids(self) -> list[int]:
        return [i.id for i in self.items]

    @property
    def readings(self) -> int:
        return sum(i.chunk.count for i in self.items)
