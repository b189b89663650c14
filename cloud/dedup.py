"""Cloud-side duplicate logic, pure (no I/O): stores and the ingest call it.

Two lines of defence, in the order the ingest applies them:

1. **Sequence idempotency** (:class:`IdempotencyState`). Every reading carries its
   device's sequence number. Per device the state is a *watermark* (every seq <= it is
   stored) plus *exceptions*: sorted, disjoint, non-adjacent ranges above it, for
   batches that arrived out of order. A resent batch's seqs are all ``contains()``-ed:
   it is acked again and written zero times. The state serializes to a few bytes
   (varints) so the store persists it in the same transaction as the readings; that is
   what makes it survive ingest restarts and be shared by replicas (a replica reads,
   updates and writes it under the store's row lock / transaction).
   Sequence numbers start at 1 (0 = never accepted). Gaps that will never fill (chunks
   evicted on the device) can be closed with :meth:`IdempotencyState.advance_floor`. If
   exceptions exceed ``max_ranges`` (priorities interleave seqs, so a backlog of
   lower-priority chunks opens one gap per higher-priority reading), the *lowest
   exception range is forgotten*, never a gap closed: forgetting only makes the state
   say "not stored yet" for seqs that were, so a resend of them is written again and
   the store's unique (device, seq) key counts it as a duplicate. Closing a gap instead
   would ack still-unsent readings as duplicates without writing them: data loss.
   Forgotten ranges are counted (``ranges_forgotten``).

   A reading that got a *new* sequence number (a source redelivered it after an agent
   restart) is not caught here, and no store has a natural-key constraint that would
   catch it: it would be stored twice. It is caught on the device before it is
   numbered: the edge dedup window (:mod:`agent.dedup`) keeps the fingerprints of what a
   source can deliver again in the durable buffer, committed with the readings they
   admitted, and restores them at start.

2. **Redundant gateways** (:class:`GatewayDeduper`): the same sensor (same
   ``sensor`` identity, e.g. a LoRa DevEUI-based id) heard by two gateways arrives as two
   readings of two devices. Copies from *different* gateways whose corrected times are
   within ``tolerance_ms`` (and, with ``match_values``, whose values are equal within
   ``value_tol``) are one event, kept once. Copies from the *same* gateway are never
   merged (they are distinct samples, caught by 1, or caught at the edge). Which copy is
   stored is decided by a :class:`ConflictPolicy`; a non-"first" policy can ask the
   store to *replace* the stored copy. ``tolerance_ms`` must be well below the sensor's
   sampling period and above the time uncertainty after correction. The deduper's memory
   is per process: after an ingest restart, a copy whose twin was stored before it is
   stored too.

Conflict policies (:class:`ConflictPolicy`, counted by :class:`ConflictResolver`) for two
different values of the same series at the same corrected instant (or two gateway copies):

- ``first``: the stored reading stays; the newcomer is dropped (insert-only stores).
- ``last``: the newcomer replaces the stored reading.
- ``best_quality``: keep the better one, by (sensor fault, time uncertain, time anchored,
  uncertainty ms, late) ascending; ties keep the stored one.
- ``average``: store the mean of the values (and, for gateway copies, of the times) with
  the union of the quality flags and the larger uncertainty. :class:`GatewayDeduper`
  tracks the copy count so three or more copies are weighted equally; a store resolving
  pairwise passes ``count``.
"""

from __future__ import annotations

import bisect
import enum
import math
from collections.abc import Callable, Iterable, Sequence

import msgspec

from pymigrate.errors import ConfigError, DecodeError
from pymigrate.types import Quality, Reading

__all__ = [
    "ConflictPolicy",
    "ConflictResolver",
    "GatewayDeduper",
    "GatewayResult",
    "IdempotencyState",
    "Resolution",
    "quality_rank",
    "resolve",
]

_STATE_VERSION = 2  # 2 adds ranges_forgotten; 1 is still read


# -- 1. sequence idempotency --------------------------------------------------------------
def _put_varint(out: bytearray, n: int) -> None:
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _get_varint(data: bytes, pos: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise DecodeError("idempotency state truncated or malformed",
                              reason="idempotency_state")
        byte = data[pos]
        pos += 1
        n |= (byte & 0x7F) << shift
        if byte < 0x80:
            return n, pos
        shift += 7


class IdempotencyState:
    """Acked sequence numbers of one device: watermark + exception ranges."""

    __slots__ = ("_ends", "_starts", "gaps_closed", "max_ranges", "ranges_forgotten",
                 "watermark")

    def __init__(self, watermark: int = 0, ranges: Iterable[tuple[int, int]] = (),
                 *, max_ranges: int = 4096) -> None:
        if watermark < 0:
            raise ValueError("watermark must be >= 0")
        self.watermark = watermark
        self.max_ranges = max_ranges
        self.gaps_closed = 0  # explicit advance_floor() closes only
        self.ranges_forgotten = 0
        self._starts: list[int] = []
        self._ends: list[int] = []
        for a, b in ranges:
            self.add_range(a, b)

    def contains(self, seq: int) -> bool:
        """True when ``seq`` was already stored."""
        if seq <= self.watermark:
            return True
        i = bisect.bisect_right(self._starts, seq) - 1
        return i >= 0 and seq <= self._ends[i]

    def missing(self, a: int, b: int) -> list[tuple[int, int]]:
        """Sub-ranges of ``[a, b]`` not yet stored (what a batch still has to write)."""
        a = max(a, self.watermark + 1)
        out: list[tuple[int, int]] = []
        if a > b:
            return out
        i = max(0, bisect.bisect_right(self._starts, a) - 1)
        cur = a
        while cur <= b and i < len(self._starts):
            s, e = self._starts[i], self._ends[i]
            if e < cur:
                i += 1
                continue
            if s > b:
                break
            if s > cur:
                out.append((cur, s - 1))
            cur = e + 1
            i += 1
        if cur <= b:
            out.append((cur, b))
        return out

    def add(self, seq: int) -> int:
        return self.add_range(seq, seq)

    def add_range(self, a: int, b: int) -> int:
        """Mark ``[a, b]`` stored; returns how many seqs were new."""
        if a > b:
            raise ValueError(f"empty range [{a}, {b}]")
        a = max(a, self.watermark + 1)
        if a > b:
            return 0
        starts, ends = self._starts, self._ends
        i = bisect.bisect_left(ends, a - 1)  # first range touching or after a
        j = bisect.bisect_right(starts, b + 1)  # ranges before j start at or before b+1
        covered = sum(max(0, min(b, ends[k]) - max(a, starts[k]) + 1) for k in range(i, j))
        lo, hi = a, b
        if i < j:
            lo, hi = min(a, starts[i]), max(b, ends[j - 1])
        starts[i:j] = [lo]
        ends[i:j] = [hi]
        if starts[0] <= self.watermark + 1:
            self.watermark = ends[0]
            del starts[0], ends[0]
        while len(starts) > self.max_ranges:
            # forget (never close): the store's unique key still catches a resend
            del starts[0], ends[0]
            self.ranges_forgotten += 1
        return (b - a + 1) - covered

    def advance_floor(self, seq: int) -> None:
        """Treat every seq below ``seq`` as settled (sent or evicted on the device)."""
        if seq - 1 <= self.watermark:
            return
        self.watermark = seq - 1
        starts, ends = self._starts, self._ends
        k = bisect.bisect_right(ends, self.watermark)
        del starts[:k], ends[:k]
        if starts and starts[0] <= self.watermark + 1:
            self.watermark = max(self.watermark, ends[0])
            del starts[0], ends[0]

    def ranges(self) -> list[tuple[int, int]]:
        """The exception ranges above the watermark, sorted."""
        return list(zip(self._starts, self._ends))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, IdempotencyState):
            return NotImplemented
        return self.watermark == other.watermark and self.ranges() == other.ranges()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"IdempotencyState(watermark={self.watermark}, ranges={self.ranges()})"

    def to_bytes(self) -> bytes:
        """Compact form: version, watermark, ranges forgotten so far, count, then (gap,
        length) varint deltas."""
        out = bytearray([_STATE_VERSION])
        _put_varint(out, self.watermark)
        _put_varint(out, self.ranges_forgotten)
        _put_varint(out, len(self._starts))
        prev = self.watermark
        for s, e in zip(self._starts, self._ends):
            _put_varint(out, s - prev)
            _put_varint(out, e - s)
            prev = e
        return bytes(out)

    @classmethod
    def from_bytes(cls, data: bytes, *, max_ranges: int = 4096) -> IdempotencyState:
        """Inverse of :meth:`to_bytes`; raises DecodeError on malformed input."""
        if not data or data[0] not in (1, _STATE_VERSION):
            raise DecodeError("unknown idempotency state version", reason="idempotency_state")
        w, pos = _get_varint(data, 1)
        forgotten = 0
        if data[0] >= 2:
            forgotten, pos = _get_varint(data, pos)
        n, pos = _get_varint(data, pos)
        state = cls(w, max_ranges=max_ranges)
        state.ranges_forgotten = forgotten
        prev = w
        for _ in range(n):
            gap, pos = _get_varint(data, pos)
            length, pos = _get_varint(data, pos)
            if gap < 2:
                raise DecodeError("idempotency ranges overlap", reason="idempotency_state")
            s = prev + gap
            state._starts.append(s)
            state._ends.append(s + length)
            prev = s + length
        if pos != len(data):
            raise DecodeError("trailing bytes in idempotency state", reason="idempotency_state")
        return state


# -- conflict policies ----------------------------------------------------------------------
class ConflictPolicy(enum.StrEnum):
    """How two readings of the same series and instant are resolved (module docstring)."""

    FIRST = "first"
    LAST = "last"
    BEST_QUALITY = "best_quality"
    AVERAGE = "average"

    @classmethod
    def parse(cls, value: str | ConflictPolicy, *, key: str = "dedup.conflict_policy"
              ) -> ConflictPolicy:
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(key, f"unknown policy {value!r} (expected one of "
                                   f"{', '.join(p.value for p in cls)})") from None


_FAULT = int(Quality.SENSOR_FAULT)
_UNCERTAIN = int(Quality.TIME_UNCERTAIN)
_ANCHORED = int(Quality.TIME_ANCHORED)
_LATE = int(Quality.LATE)


def quality_rank(r: Reading) -> tuple[bool, bool, bool, int, bool]:
    """Sort key of :attr:`ConflictPolicy.BEST_QUALITY`: lower is better."""
    q = r.quality
    return (bool(q & _FAULT), bool(q & _UNCERTAIN), bool(q & _ANCHORED), r.uncert_ms,
            bool(q & _LATE))


def resolve(policy: ConflictPolicy, stored: Reading, incoming: Reading, *, count: int = 1,
            average_time: bool = False) -> Reading:
    """The reading to keep; ``stored`` itself (identity) means "keep, drop incoming".

    ``count`` is how many copies ``stored`` already stands for (for ``average``).
    """
    if policy is ConflictPolicy.FIRST:
        return stored
    if policy is ConflictPolicy.LAST:
        return incoming
    if policy is ConflictPolicy.BEST_QUALITY:
        return incoming if quality_rank(incoming) < quality_rank(stored) else stored
    n = count
    value = (stored.value * n + incoming.value) / (n + 1)
    ts = round((stored.ts_ms * n + incoming.ts_ms) / (n + 1)) if average_time else stored.ts_ms
    return msgspec.structs.replace(
        stored, value=value, ts_ms=ts, quality=stored.quality | incoming.quality,
        uncert_ms=max(stored.uncert_ms, incoming.uncert_ms))


class Resolution(msgspec.Struct, frozen=True):
    """Outcome: ``identical`` (same value: plain duplicate), ``keep`` or ``replace``."""

    action: str
    reading: Reading


class ConflictResolver:
    """Applies a policy to (stored, incoming) pairs of one series and instant; counts."""

    def __init__(self, policy: ConflictPolicy | str = ConflictPolicy.FIRST) -> None:
        self.policy = ConflictPolicy.parse(policy)
        self.counts = {"identical": 0, "conflicts": 0, "kept": 0, "replaced": 0}

    def resolve(self, stored: Reading, incoming: Reading, *, count: int = 1) -> Resolution:
        if stored.value == incoming.value or (math.isnan(stored.value)
                                              and math.isnan(incoming.value)):
            self.counts["identical"] += 1
            return Resolution("identical", stored)
        self.counts["conflicts"] += 1
        out = resolve(self.policy, stored, incoming, count=count)
        if out is stored:
            self.counts["kept"] += 1
            return Resolution("keep", stored)
        self.counts["replaced"] += 1
        return Resolution("replace", out)


# -- 2. redundant gateways ------------------------------------------------------------------
class GatewayResult(msgspec.Struct):
    """What the store must do: insert ``store``, skip ``dropped``, apply ``replaced``
    as (stored reading, reading that takes its place); ``replaced_instances[i]`` is the
    stream instance the stored copy of ``replaced[i]`` came in with."""

    store: list[Reading]
    dropped: list[Reading]
    replaced: list[tuple[Reading, Reading]]
    replaced_instances: list[str] = msgspec.field(default_factory=list)


class _Event:
    __slots__ = ("count", "devices", "instance", "kept", "ts")

    def __init__(self, r: Reading, instance: str) -> None:
        self.ts = r.ts_ms
        self.kept = r
        self.instance = instance  # the stream (agent instance) the kept copy is stored in
        self.devices = {r.device_id}
        self.count = 1


class GatewayDeduper:
    """Keeps one copy of a sensor's event heard by several gateways (module docstring).

    Memory: per sensor identity, events within ``horizon_ms`` of its newest one and at
    most ``max_per_sensor``; :meth:`expire` drops idle identities.
    """

    def __init__(self, tolerance_ms: int, policy: ConflictPolicy | str = ConflictPolicy.FIRST,
                 *, key: Callable[[Reading], str] | None = None, match_values: bool = True,
                 value_tol: float = 0.0, horizon_ms: int = 6 * 3600 * 1000,
                 max_per_sensor: int = 4096) -> None:
        if tolerance_ms < 0:
            raise ConfigError("dedup.gateway_tolerance_ms", "must be >= 0")
        self.tolerance_ms = tolerance_ms
        self.policy = ConflictPolicy.parse(policy, key="dedup.gateway_policy")
        self._key = key or (lambda r: r.sensor)
        self.match_values = match_values
        self.value_tol = value_tol
        self.horizon_ms = horizon_ms
        self.max_per_sensor = max_per_sensor
        self._events: dict[str, tuple[list[int], list[_Event]]] = {}
        self._newest: dict[str, int] = {}
        self.counts = {"kept": 0, "dropped": 0, "replaced": 0, "conflicts": 0}

    def offer(self, readings: Sequence[Reading], instance: str = "") -> GatewayResult:
        """Classify readings (already time-corrected) against the recent events;
        ``instance`` is the stream they arrive in (two agents may share a device id)."""
        res = GatewayResult([], [], [])
        for r in readings:
            k = self._key(r)
            tss, evs = self._events.setdefault(k, ([], []))
            ev = self._match(r, tss, evs)
            if ev is None:
                i = bisect.bisect_right(tss, r.ts_ms)
                tss.insert(i, r.ts_ms)
                evs.insert(i, _Event(r, instance))
                res.store.append(r)
                self.counts["kept"] += 1
                self._trim(k, tss, evs, r.ts_ms)
                continue
            if r.value != ev.kept.value:
                self.counts["conflicts"] += 1
            new = resolve(self.policy, ev.kept, r, count=ev.count, average_time=True)
            ev.devices.add(r.device_id)
            ev.count += 1
            if new is ev.kept:
                res.dropped.append(r)
                self.counts["dropped"] += 1
            else:
                res.replaced.append((ev.kept, new))
                res.replaced_instances.append(ev.instance)
                if new is r:
                    ev.instance = instance
                ev.kept = new
                self.counts["replaced"] += 1
        return res

    def _match(self, r: Reading, tss: list[int], evs: list[_Event]) -> _Event | None:
        lo = bisect.bisect_left(tss, r.ts_ms - self.tolerance_ms)
        hi = bisect.bisect_right(tss, r.ts_ms + self.tolerance_ms)
        best: _Event | None = None
        for ev in evs[lo:hi]:
            if r.device_id in ev.devices:
                continue
            if self.match_values and abs(ev.kept.value - r.value) > self.value_tol:
                continue
            if best is None or abs(ev.ts - r.ts_ms) < abs(best.ts - r.ts_ms):
                best = ev
        return best

    def _trim(self, k: str, tss: list[int], evs: list[_Event], ts: int) -> None:
        newest = max(self._newest.get(k, ts), ts)
        self._newest[k] = newest
        cut = bisect.bisect_left(tss, newest - self.horizon_ms)
        cut = max(cut, len(tss) - self.max_per_sensor)
        if cut > 0:
            del tss[:cut], evs[:cut]

    def expire(self, now_ms: int) -> int:
        """Forget identities idle for longer than the horizon; returns how many."""
        idle = [k for k, t in self._newest.items() if t < now_ms - self.horizon_ms]
        for k in idle:
            del self._newest[k], self._events[k]
        return len(idle)

    def __len__(self) -> int:
        return sum(len(t) for t, _ in self._events.values())
