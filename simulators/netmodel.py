"""A small, pure network model and an uplink that runs over it on virtual time.

:class:`NetModel` decides the fate of one request/response exchange: per-packet loss
(independent, Bernoulli), one-way latency with jitter, bandwidth, optional link-level
retransmissions (``link_retries``: 0 behaves like datagrams, e.g. CoAP NON; >0 like a
transport that resends lost packets after a doubling RTO), and outages (the far end is
unreachable). It only computes; it never sleeps.

:class:`SimCloud` is the receiving side: it records which sequence numbers arrived (so
"delivered" is measured where it matters) and answers duplicates as such.
:class:`SimulatedUplink` implements ``transports.base.Uplink`` over a model, a cloud and
an injected clock, and counts the bytes it put on the wire.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import msgspec

from pymigrate.clock import Clock, VirtualClock
from pymigrate.envelope import decode_batch
from pymigrate.errors import ThrottledError, TransportError
from pymigrate.types import Ack

__all__ = ["Exchange", "NetModel", "SimCloud", "SimulatedUplink", "advance_settled"]


class Exchange(msgspec.Struct, frozen=True):
    """The fate of one exchange."""

    request_ok: bool  # the request reached the far end
    response_ok: bool  # ... and its answer came back
    request_s: float  # until the request arrived (or its last retransmission gave up)
    response_s: float  # then until the answer arrived
    wire_bytes: int  # bytes transmitted both ways, packet headers included

    @property
    def duration_s(self) -> float:
        return self.request_s + self.response_s


class NetModel:
    """Loss, latency, bandwidth, link retransmissions and outages."""

    def __init__(self, *, loss: float = 0.0, latency_s: float = 0.1, jitter_s: float = 0.02,
                 bandwidth_bps: float = 250_000.0, mtu: int = 1200, header_bytes: int = 40,
                 link_retries: int = 0, link_rto_s: float = 1.0,
                 outages: Sequence[tuple[float, float]] = (),
                 rng: random.Random | None = None) -> None:
        if not 0.0 <= loss < 1.0:
            raise ValueError("loss must be in [0, 1)")
        self.loss = loss
        self.latency_s = latency_s
        self.jitter_s = jitter_s
        self.bandwidth = bandwidth_bps / 8.0  # bytes per second
        self.mtu = mtu
        self.header = header_bytes
        self.link_retries = link_retries
        self.link_rto_s = link_rto_s
        self.outages = sorted(outages)
        self.rng = rng or random.Random(0)

    def down(self, t: float) -> bool:
        """True while an outage makes the far end unreachable (monotonic seconds)."""
        return any(a <= t < b for a, b in self.outages)

    def packets(self, nbytes: int) -> int:
        return max(1, math.ceil(nbytes / self.mtu))

    def _leg(self, nbytes: int) -> tuple[bool, float, int]:
        """One direction: (arrived, seconds, wire bytes)."""
        n = self.packets(nbytes)
        wire = nbytes + n * self.header
        t = self.latency_s + self.rng.uniform(0.0, self.jitter_s) + wire / self.bandwidth
        for _ in range(n):
            tries = 0
            while self.rng.random() < self.loss:
                if tries >= self.link_retries:
                    return False, t, wire
                t += self.link_rto_s * (2 ** tries)
                wire += min(nbytes, self.mtu) + self.header
                tries += 1
        return True, t, wire

    def exchange(self, request_bytes: int, response_bytes: int = 120) -> Exchange:
        """Send a request, get a response: what happens (pure apart from the RNG)."""
        ok, t1, w1 = self._leg(request_bytes)
        if not ok:
            return Exchange(False, False, t1, 0.0, w1)
        ok2, t2, w2 = self._leg(response_bytes)
        return Exchange(True, ok2, t1, t2, w1 + w2)


class SimCloud:
    """Idempotent receiver: first arrival time per (device, seq_first) chunk."""

    def __init__(self, *, quota_per_s: float = 0.0, burst: float = 10.0) -> None:
        self.first_seen_ms: dict[tuple[str, int], int] = {}
        self.readings = 0
        self.batches = 0
        self.duplicates = 0
        self.quota_per_s = quota_per_s  # 0: unlimited; else a token bucket of batches
        self.burst = burst
        self._tokens = burst
        self._t = 0.0
        self.throttled = 0

    def admit(self, t: float) -> float:
        """Token bucket: 0 when admitted, else the seconds to wait (retry-after)."""
        if self.quota_per_s <= 0:
            return 0.0
        self._tokens = min(self.burst, self._tokens + (t - self._t) * self.quota_per_s)
        self._t = t
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        self.throttled += 1
        return (1.0 - self._tokens) / self.quota_per_s

    def receive(self, payload: bytes, now_ms: int) -> str:
        batch = decode_batch(payload)
        self.batches += 1
        new = False
        for c in batch.chunks:
            key = (c.device_id, c.seq_first)
            if key not in self.first_seen_ms:
                self.first_seen_ms[key] = now_ms
                self.readings += c.count
                new = True
        if not new:
            self.duplicates += 1
        return "ok" if new else "duplicate"


class SimulatedUplink:
    """An ``Uplink`` whose exchanges follow a :class:`NetModel` on the injected clock."""

    end_to_end = True

    def __init__(self, model: NetModel, cloud: SimCloud, clock: Clock, *,
                 name: str = "sim", max_payload: int = 256 * 1024,
                 connect_fail_s: float = 0.2) -> None:
        self.model = model
        self.cloud = cloud
        self.clock = clock
        self.name = name
        self.max_payload = max_payload
        self.connect_fail_s = connect_fail_s
        self.wire_bytes = 0
        self.attempts = 0

    async def connect(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def send(self, payload: bytes, *, batch_id: str,
                   timeout: float) -> Ack:  # noqa: ASYNC109 - part of the Uplink contract
        self.attempts += 1
        now = self.clock.monotonic()
        if self.model.down(now):
            # unreachable: a SYN goes out, nothing comes back before the connect timeout
            self.wire_bytes += self.model.header
            await self.clock.sleep(min(timeout, self.connect_fail_s))
            raise TransportError("unreachable (outage)")
        ex = self.model.exchange(len(payload))
        self.wire_bytes += ex.wire_bytes
        if not ex.request_ok or ex.request_s >= timeout:
            if ex.request_ok:  # arrives after we gave up: stored, but we will not know
                self.cloud.receive(payload, self.clock.time_ms() + int(ex.request_s * 1000))
            await self.clock.sleep(timeout)
            raise TransportError("timeout")
        await self.clock.sleep(ex.request_s)
        wait = self.cloud.admit(self.clock.monotonic())
        if wait > 0:
            await self.clock.sleep(ex.response_s)
            raise ThrottledError(retry_after_s=math.ceil(wait))
        t_recv = self.clock.time_ms()
        status = self.cloud.receive(payload, t_recv)
        if not ex.response_ok or ex.duration_s > timeout:
            await self.clock.sleep(timeout - ex.request_s)
            raise TransportError("timeout (ack lost)")
        await self.clock.sleep(ex.response_s)
        return Ack(batch_id, status, t_recv, t_recv)


async def advance_settled(clock: VirtualClock, seconds: float, *, rounds: int = 40) -> None:
    """Advance virtual time, letting every woken task run to its next sleep.

    ``VirtualClock.advance`` settles a few loop iterations per wake-up; stages that hop
    through several awaits between sleeps need more, or their next sleep is registered
    after time has already jumped past it.
    """
    target = clock.monotonic() + seconds
    while True:
        await clock.settle(rounds)
        nxt = clock.next_deadline()
        if nxt is None or nxt > target:
            break
        await clock.advance(max(0.0, nxt - clock.monotonic()))
    await clock.advance(max(0.0, target - clock.monotonic()))
    await clock.settle(rounds)
