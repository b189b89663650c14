"""A scriptable fake uplink: records batches, fails/throttles/delays on command."""

from __future__ import annotations

import asyncio
import collections

from pymigrate.clock import Clock
from pymigrate.envelope import Batch, decode_batch
from pymigrate.errors import PayloadRejected, ThrottledError, TransportError
from pymigrate.types import Ack


class FakeUplink:
    """Actions (queued with :meth:`script`, else ``default``): ``ok``, ``dup``, ``fail``,
    ``timeout`` (sleeps the timeout, then fails), ``throttle:<s>``, ``throttle_ack:<s>``,
    ``reject``, ``reject_ack``, ``oserror``. ``delay_s`` is the virtual RTT of an answer.
    ``reject_seqs`` rejects (PayloadRejected) any batch containing one of these seqs.
    """

    def __init__(self, clock: Clock, name: str = "fake", *, max_payload: int = 256 * 1024,
                 delay_s: float = 0.1, default: str = "ok") -> None:
        self.clock = clock
        self.name = name
        self.max_payload = max_payload
        self.end_to_end = True
        self.delay_s = delay_s
        self.default = default
        self.actions: collections.deque[str] = collections.deque()
        self.sent: list[Batch] = []  # every attempt, decoded
        self.delivered: list[Batch] = []  # attempts answered ok/dup
        self.timeouts: list[float] = []
        self.connects = 0
        self.closes = 0
        self.connect_fails = 0
        self.reject_seqs: set[int] = set()
        # like the real ingest, a rejection says the cloud kept the payload (False: a
        # cloud that refuses without keeping it; the device must keep the data)
        self.dead_letter_rejections = True
        self.sent_event = asyncio.Event()  # set on every send() call

    def script(self, *actions: str) -> None:
        self.actions.extend(actions)

    async def connect(self) -> None:
        self.connects += 1
        if self.connect_fails:
            self.connect_fails -= 1
            raise TransportError("connection refused")

    async def close(self) -> None:
        self.closes += 1

    async def send(self, payload: bytes, *, batch_id: str, timeout: float) -> Ack:  # noqa: ASYNC109
        batch = decode_batch(payload)
        assert batch.batch_id == batch_id
        assert len(payload) <= self.max_payload
        self.sent.append(batch)
        self.sent_event.set()
        self.timeouts.append(timeout)
        action = self.actions.popleft() if self.actions else self.default
        if action == "timeout":
            await self.clock.sleep(timeout)
            raise TransportError("timeout")
        await self.clock.sleep(self.delay_s)
        now = self.clock.time_ms()
        kind, _, arg = action.partition(":")
        if any(c.seq_first <= s <= c.seq_last for c in batch.chunks for s in self.reject_seqs):
            raise PayloadRejected("bad chunk", reason="decode",
                                  dead_lettered=self.dead_letter_rejections)
        if kind == "fail":
            raise TransportError("link down")
        if kind == "oserror":
            raise ConnectionResetError("reset")
        if kind == "throttle":
            raise ThrottledError(retry_after_s=float(arg or 1))
        if kind == "throttle_ack":
            return Ack(batch_id, "throttled", now, now, retry_after_s=float(arg or 1))
        if kind == "reject":
            raise PayloadRejected("refused", reason="schema",
                                  dead_lettered=self.dead_letter_rejections)
        if kind == "reject_ack":
            return Ack(batch_id, "rejected", now, now, reason="schema",
                       dead_lettered=self.dead_letter_rejections)
        if kind == "weird":
            return Ack(batch_id, "what", now, now)
        self.delivered.append(batch)
        status = "duplicate" if kind == "dup" else "ok"
        # server times half a round trip back (received and answered at once): a sample
        # the clock model can take
        mid = now - int(self.delay_s * 500)
        return Ack(batch_id, status, mid, mid, accepted=batch.count, count=batch.count,
                   gaps=len(batch.gaps))

    @property
    def seqs(self) -> list[int]:
        """First seq of every delivered chunk, in delivery order."""
        return [c.seq_first for b in self.delivered for c in b.chunks]
