"""Window handlers: one small class per window type, sharing :class:`Emitter`.

A handler owns no series state itself: the aggregator keeps one state object per
(rule, device, sensor) and hands it in. Event-time semantics: per series, the watermark
is the highest timestamp seen minus the allowed lateness; a window closes when the
watermark (or wall time, via :meth:`on_time`) passes its end. A reading whose windows
have all closed is *late* (``Status.LATE``); the aggregator counts it and applies the
rule's ``late_policy``.
"""

from __future__ import annotations

import enum
import math
from typing import Any

import msgspec

from agent.aggregate.accumulator import Accumulator
from agent.aggregate.config import (
    CountWindow,
    DeadbandWindow,
    HoppingWindow,
    RawWindow,
    RuleConfig,
    SessionWindow,
    ThresholdWindow,
    TumblingWindow,
    percentile_of,
)
from agent.aggregate.lttb import lttb_indices
from pymigrate.types import AggInfo, Priority, Quality, Reading

__all__ = ["PARTIAL_SUFFIX", "Emitter", "Handler", "Status", "build_handler", "is_partial"]

PARTIAL_SUFFIX = "~partial"
"""Appended to ``AggInfo.rule`` of a window emitted before it was complete (stop, rule
change): e.g. ``weather10m~partial``. The values are right for the readings it covers."""

_NEG = -(1 << 62)
_AGG = int(Quality.AGGREGATE)
_CARRIED = ~int(Quality.LATE | Quality.AGGREGATE)  # input flags an aggregate inherits
LTTB_BUFFER_MAX = 65_536


def is_partial(agg: AggInfo | None) -> bool:
    """True when an aggregate was emitted from an incomplete window."""
    return agg is not None and agg.rule.endswith(PARTIAL_SUFFIX)


class Status(enum.Enum):
    OK = 0
    LATE = 1  # missed every window it belongs to (or out of order for deadband)
    PARTLY_LATE = 2  # hopping: missed some of its windows, added to the others


class Counters:
    """Mutable counters shared by the emitter and the aggregator."""

    __slots__ = ("aggregates_out", "late", "late_dropped", "late_raw", "partial_windows",
                 "raw_passed", "readings_in", "suppressed", "unmatched", "windows_closed")

    def __init__(self) -> None:
        self.readings_in = 0
        self.raw_passed = 0
        self.aggregates_out = 0
        self.windows_closed = 0
        self.partial_windows = 0
        self.late = 0
        self.late_raw = 0
        self.late_dropped = 0
        self.suppressed = 0
        self.unmatched = 0


class Emitter:
    """Turns closed windows and passed readings into output Readings for one rule."""

    def __init__(self, rule: RuleConfig, counters: Counters) -> None:
        self.rule = rule
        self.name = rule.rule_name
        self.functions = list(rule.functions)
        self.priority = Priority.parse(rule.priority)
        self.raw_priority = Priority.parse(rule.raw_priority) if rule.raw_priority else None
        self.lttb = rule.lttb
        self.alpha = (rule.percentile_rel_error
                      if any(percentile_of(f) is not None for f in rule.functions) else None)
        self.c = counters

    def new_acc(self) -> Accumulator:
        return Accumulator(self.alpha)

    def raw(self, out: list[Reading], r: Reading, *, late: bool = False) -> None:
        changes: dict[str, Any] = {}
        if self.raw_priority is not None and r.priority != self.raw_priority:
            changes["priority"] = self.raw_priority
        if late:
            changes["quality"] = r.quality | Quality.LATE
        out.append(msgspec.structs.replace(r, **changes) if changes else r)
        self.c.raw_passed += 1

    def emit(self, out: list[Reading], st: SeriesState, w: Win, start: int, end: int, *,
             partial: bool = False) -> None:
        """Emit a closed window ``[start, end)`` of series ``st``."""
        self.window(out, st.device, st.sensor, start, end, w.acc, w.pts, partial=partial,
                    quality=w.q)

    def window(self, out: list[Reading], device: str, sensor: str, start: int, end: int,
               acc: Accumulator, pts: list[Reading] | None, *, partial: bool = False,
               quality: int = 0) -> None:
        rule = self.name + PARTIAL_SUFFIX if partial else self.name
        q = _AGG | quality
        self.c.windows_closed += 1
        if partial:
            self.c.partial_windows += 1
        for fn in self.functions:
            out.append(Reading(
                device_id=device, sensor=sensor, ts_ms=start, value=acc.value(fn),
                priority=self.priority, quality=q,
                agg=AggInfo(rule=rule, fn=fn, window_end_ms=end, count=acc.n)))
        self.c.aggregates_out += len(self.functions)
        if self.lttb and pts:
            pts = sorted(pts, key=lambda p: p.ts_ms)  # stable: arrival order on equal ts
            keep = lttb_indices([p.ts_ms for p in pts], [p.value for p in pts], self.lttb)
            info = AggInfo(rule=rule, fn="lttb", window_end_ms=end, count=acc.n)
            for i in keep:
                out.append(msgspec.structs.replace(pts[i], priority=self.priority, agg=info))
            self.c.aggregates_out += len(keep)


# ---- window bookkeeping -----------------------------------------------------------------


class Win:
    """One open window: ``[start, end)`` in event time plus its accumulator.

    ``q`` ORs the inputs' quality flags (time uncertain, sensor fault...) so an aggregate
    says what it was made of. LTTB buffers are bounded: past :data:`LTTB_BUFFER_MAX`
    points the buffer is LTTB-reduced to half in place (extremes and ends survive).
    """

    __slots__ = ("acc", "end", "pts", "q", "start")

    def __init__(self, start: int, end: int, acc: Accumulator, lttb: bool) -> None:
        self.start = start
        self.end = end
        self.acc = acc
        self.q = 0
        self.pts: list[Reading] | None = [] if lttb else None

    def add(self, r: Reading) -> None:
        self.acc.add(r.ts_ms, r.value)
        self.q |= r.quality & _CARRIED
        if self.pts is not None:
            self.pts.append(r)
            if len(self.pts) >= LTTB_BUFFER_MAX:
                self.pts = _reduce(self.pts, LTTB_BUFFER_MAX // 2)

    def absorb(self, other: Win) -> None:
        """Merge another window of the same series into this one (session bridging)."""
        self.acc.merge(other.acc)
        self.q |= other.q
        if self.pts is not None and other.pts is not None:
            self.pts = self.pts + other.pts
            if len(self.pts) >= LTTB_BUFFER_MAX:
                self.pts = _reduce(self.pts, LTTB_BUFFER_MAX // 2)

    def dump(self) -> list[Any]:
        return [self.start, self.end, self.acc.to_state(), self.pts, self.q]

    @classmethod
    def load(cls, d: list[Any]) -> Win:
        w = cls(int(d[0]), int(d[1]), Accumulator.from_state(d[2]), False)
        w.pts = None if d[3] is None else [msgspec.convert(p, Reading) for p in d[3]]
        w.q = int(d[4])
        return w


def _reduce(pts: list[Reading], n: int) -> list[Reading]:
    pts = sorted(pts, key=lambda p: p.ts_ms)
    keep = lttb_indices([p.ts_ms for p in pts], [p.value for p in pts], n)
    return [pts[i] for i in keep]


class SeriesState:
    """Everything a handler keeps for one (rule, device, sensor)."""

    __slots__ = (
        "device",
        "flag",
        "frontier",
        "max_ts",
        "pending",
        "sensor",
        "sent_ts",
        "sent_v",
        "wins",
    )

    def __init__(self, device: str, sensor: str) -> None:
        self.device = device
        self.sensor = sensor
        self.max_ts = _NEG  # highest event time seen
        self.frontier = _NEG  # every window ending at or before this has been emitted
        self.wins: list[Win] = []
        self.pending: Reading | None = None  # deadband: latest reading not yet sent
        self.sent_ts = _NEG  # deadband: last sent reading
        self.sent_v = math.nan
        self.flag = False  # threshold: inside an excursion

    def dump(self) -> list[Any]:
        return [self.max_ts, self.frontier, [w.dump() for w in self.wins], self.pending,
                self.sent_ts, self.sent_v, self.flag]

    @classmethod
    def load(cls, device: str, sensor: str, d: list[Any]) -> SeriesState:
        st = cls(device, sensor)
        st.max_ts, st.frontier = int(d[0]), int(d[1])
        st.wins = [Win.load(w) for w in d[2]]
        st.pending = None if d[3] is None else msgspec.convert(d[3], Reading)
        st.sent_ts, st.sent_v, st.flag = int(d[4]), float(d[5]), bool(d[6])
        return st


class Handler:
    """Base: the raw pass-through (``type = "raw"``)."""

    lateness_ms = 0

    def __init__(self, em: Emitter) -> None:
        self.em = em
        self.lateness_ms = round(em.rule.allowed_lateness_s * 1000)

    def on_reading(self, st: SeriesState, r: Reading, out: list[Reading]) -> tuple[Status, bool]:
        """Absorb one reading; returns (status, whether it was already passed raw)."""
        self.em.raw(out, r)
        return Status.OK, True

    def on_time(self, st: SeriesState, now_ms: int, out: list[Reading]) -> None:
        """Wall time reached ``now_ms``: close what is due."""

    def deadline(self, st: SeriesState) -> int | None:
        """Wall time (ms) at which :meth:`on_time` has something to do, or None."""
        return None

    def flush(self, st: SeriesState, out: list[Reading]) -> None:
        """Emit everything still open (marked partial) and forget it."""
        for w in st.wins:
            self.em.emit(out, st, w, w.start, w.end, partial=True)
        st.wins = []


class TimeHandler(Handler):
    """Tumbling (hop == size) and hopping windows aligned to the epoch."""

    def __init__(self, em: Emitter, size_s: float, hop_s: float) -> None:
        super().__init__(em)
        self.size = round(size_s * 1000)
        self.hop = round(hop_s * 1000)

    def _starts(self, ts: int) -> list[int]:
        s = ts - ts % self.hop
        out = []
        while s + self.size > ts:
            out.append(s)
            s -= self.hop
        return out

    def on_reading(self, st: SeriesState, r: Reading, out: list[Reading]) -> tuple[Status, bool]:
        ts = r.ts_ms
        closed_to = max(st.frontier, st.max_ts - self.lateness_ms)
        added = missed = 0
        for s in self._starts(ts):
            if s + self.size <= closed_to:
                missed += 1
                continue
            for w in st.wins:
                if w.start == s:
                    break
            else:
                w = Win(s, s + self.size, self.em.new_acc(), bool(self.em.lttb))
                st.wins.append(w)
            w.add(r)
            added += 1
        if ts > st.max_ts:
            st.max_ts = ts
            self._close(st, ts - self.lateness_ms, out)
        status = Status.OK if not missed else (Status.PARTLY_LATE if added else Status.LATE)
        return status, False

    def _close(self, st: SeriesState, upto: int, out: list[Reading]) -> None:
        if not st.wins or min(w.end for w in st.wins) > upto:
            return
        done = sorted((w for w in st.wins if w.end <= upto), key=lambda w: w.start)
        st.wins = [w for w in st.wins if w.end > upto]
        for w in done:
            self.em.emit(out, st, w, w.start, w.end)
            st.frontier = max(st.frontier, w.end)

    def on_time(self, st: SeriesState, now_ms: int, out: list[Reading]) -> None:
        self._close(st, now_ms - self.lateness_ms, out)

    def deadline(self, st: SeriesState) -> int | None:
        return min(w.end for w in st.wins) + self.lateness_ms if st.wins else None


class SessionHandler(Handler):
    """Session windows: ``[first, last]`` while readings are less than ``gap`` apart.

    Emitted with ``ts_ms`` = first reading, ``window_end_ms`` = last reading + 1 ms.
    A session closes once the watermark passes last + gap.
    """

    def __init__(self, em: Emitter, gap_s: float) -> None:
        super().__init__(em)
        self.gap = round(gap_s * 1000)

    def on_reading(self, st: SeriesState, r: Reading, out: list[Reading]) -> tuple[Status, bool]:
        ts, gap = r.ts_ms, self.gap
        hits = [w for w in st.wins if w.acc.first_ts - gap < ts < w.acc.last_ts + gap]
        if not hits:
            if ts + gap <= max(st.frontier, st.max_ts - self.lateness_ms):
                return Status.LATE, False
            w = Win(ts, ts + gap, self.em.new_acc(), bool(self.em.lttb))
            st.wins.append(w)
        else:
            w = hits[0]
            for other in hits[1:]:  # the reading bridges sessions: merge them
                w.absorb(other)
                st.wins.remove(other)
        w.add(r)
        w.start, w.end = w.acc.first_ts, w.acc.last_ts + gap
        if ts > st.max_ts:
            st.max_ts = ts
            self._close(st, ts - self.lateness_ms, out)
        return Status.OK, False

    def _close(self, st: SeriesState, upto: int, out: list[Reading]) -> None:
        done = sorted((w for w in st.wins if w.end <= upto), key=lambda w: w.start)
        if not done:
            return
        st.wins = [w for w in st.wins if w.end > upto]
        for w in done:
            self.em.emit(out, st, w, w.start, w.acc.last_ts + 1)
            st.frontier = max(st.frontier, w.end)

    def on_time(self, st: SeriesState, now_ms: int, out: list[Reading]) -> None:
        self._close(st, now_ms - self.lateness_ms, out)

    def deadline(self, st: SeriesState) -> int | None:
        return min(w.end for w in st.wins) + self.lateness_ms if st.wins else None

    def flush(self, st: SeriesState, out: list[Reading]) -> None:
        for w in sorted(st.wins, key=lambda w: w.start):
            self.em.emit(out, st, w, w.start, w.acc.last_ts + 1, partial=True)
        st.wins = []


class CountHandler(Handler):
    """Every ``count`` readings (arrival order) make a window; no lateness applies.

    Emitted with ``ts_ms`` = earliest reading, ``window_end_ms`` = latest reading + 1 ms.
    """

    def __init__(self, em: Emitter, count: int) -> None:
        super().__init__(em)
        self.count = count

    def on_reading(self, st: SeriesState, r: Reading, out: list[Reading]) -> tuple[Status, bool]:
        if not st.wins:
            st.wins.append(Win(r.ts_ms, r.ts_ms + 1, self.em.new_acc(), bool(self.em.lttb)))
        w = st.wins[0]
        w.add(r)
        if w.acc.n >= self.count:
            self.em.emit(out, st, w, w.acc.first_ts, w.acc.last_ts + 1)
            st.wins = []
        return Status.OK, False

    def flush(self, st: SeriesState, out: list[Reading]) -> None:
        for w in st.wins:
            self.em.emit(out, st, w, w.acc.first_ts, w.acc.last_ts + 1, partial=True)
        st.wins = []


class DeadbandHandler(Handler):
    """Report by exception. Sent readings are the real samples, unchanged (``agg`` None).

    Guarantee: a step-hold of the sent readings is within ``abs`` (and/or ``percent`` of
    the held value) of every suppressed reading. Readings older than the newest seen
    are out of order: ``Status.LATE``.
    """

    def __init__(self, em: Emitter, w: DeadbandWindow) -> None:
        super().__init__(em)
        self.abs = w.abs
        self.frac = None if w.percent is None else w.percent / 100.0
        self.hb = round(w.heartbeat_s * 1000)

    def _moved(self, last: float, v: float) -> bool:
        d = abs(v - last)
        if d != d:  # NaN on either side: report the change of state
            return not (math.isnan(v) and math.isnan(last))
        if self.abs is not None and d > self.abs:
            return True
        return self.frac is not None and d > self.frac * abs(last)

    def _send(self, st: SeriesState, r: Reading, out: list[Reading]) -> None:
        self.em.raw(out, r)
        st.sent_ts, st.sent_v = r.ts_ms, float(r.value)
        st.pending = None

    def on_reading(self, st: SeriesState, r: Reading, out: list[Reading]) -> tuple[Status, bool]:
        if r.ts_ms < st.max_ts:
            return Status.LATE, False
        st.max_ts = r.ts_ms
        if (st.sent_ts == _NEG or self._moved(st.sent_v, float(r.value))
                or (self.hb and r.ts_ms - st.sent_ts >= self.hb)):
            self._send(st, r, out)
        else:
            st.pending = r
            self.em.c.suppressed += 1
        return Status.OK, True

    def on_time(self, st: SeriesState, now_ms: int, out: list[Reading]) -> None:
        d = self.deadline(st)
        if d is not None and d <= now_ms and st.pending is not None:
            self.em.c.suppressed -= 1
            self._send(st, st.pending, out)

    def deadline(self, st: SeriesState) -> int | None:
        return st.sent_ts + self.hb if self.hb and st.pending is not None else None

    def flush(self, st: SeriesState, out: list[Reading]) -> None:
        # the latest value is not yet known upstream: send it (it is a real sample)
        if st.pending is not None:
            self.em.c.suppressed -= 1
            self._send(st, st.pending, out)


class ThresholdHandler(Handler):
    """Readings outside ``[low, high]`` pass raw, plus the first reading back in band;
    with ``size_s`` every reading is also aggregated in tumbling windows."""

    def __init__(self, em: Emitter, w: ThresholdWindow) -> None:
        super().__init__(em)
        self.low, self.high = w.low, w.high
        self.tumbling = TimeHandler(em, w.size_s, w.size_s) if w.size_s else None

    def on_reading(self, st: SeriesState, r: Reading, out: list[Reading]) -> tuple[Status, bool]:
        v = float(r.value)
        outside = (self.low is not None and v < self.low) or (
            self.high is not None and v > self.high)
        passed = outside or st.flag
        if passed:
            self.em.raw(out, r)
        st.flag = outside
        if self.tumbling is None:
            if not passed:
                self.em.c.suppressed += 1
            return Status.OK, passed
        status, _ = self.tumbling.on_reading(st, r, out)
        return status, passed

    def on_time(self, st: SeriesState, now_ms: int, out: list[Reading]) -> None:
        if self.tumbling is not None:
            self.tumbling.on_time(st, now_ms, out)

    def deadline(self, st: SeriesState) -> int | None:
        return self.tumbling.deadline(st) if self.tumbling is not None else None


def build_handler(rule: RuleConfig, counters: Counters) -> Handler:
    """The handler for a rule's window type."""
    em = Emitter(rule, counters)
    w = rule.window
    if isinstance(w, TumblingWindow):
        return TimeHandler(em, w.size_s, w.size_s)
    if isinstance(w, HoppingWindow):
        return TimeHandler(em, w.size_s, w.hop_s)
    if isinstance(w, SessionWindow):
        return SessionHandler(em, w.gap_s)
    if isinstance(w, CountWindow):
        return CountHandler(em, w.count)
    if isinstance(w, DeadbandWindow):
        return DeadbandHandler(em, w)
    if isinstance(w, ThresholdWindow):
        return ThresholdHandler(em, w)
    assert isinstance(w, RawWindow)
    return Handler(em)
