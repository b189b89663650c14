"""Timestamp reconciliation: estimate the local clock's offset and drift from the ack
samples and correct reading timestamps with that model.

Time bases
    The agent's monotonic clock (``clock.monotonic()``) is the base of the model; the
    wall clock (``clock.time_ms()``, the gateway RTC that also stamps readings) is only
    related to it. Every call observes both; ``wall - monotonic`` stays constant while
    the RTC runs normally (slow slewing, up to ``rtc_slew_ppm``, is tracked). A change larger
    than ``step_threshold_ms`` is a *jump* (backwards step, forward step, or a reset to
    an implausible year such as 1970): it opens a new *regime* (a wall->monotonic
    relation). Readings are mapped to monotonic time through the regime their raw
    timestamp fits in (newest first), so readings stamped just before a jump still map
    correctly after it. The first regime also takes readings stamped up to
    ``backfill_s`` before the first observation (queued or redelivered after a restart).

Read skew
    A process can be preempted between reading the two clocks, so one observation does
    not give ``wall - monotonic`` exactly: the wall read is bracketed by two monotonic
    reads, which bounds the relation. A regime keeps the intersection of those bounds
    (widened by ``rtc_slew_ppm`` over time) and its point estimate moves only when a bound
    proves it wrong, to the nearest bound. Within a regime the correction is thus one
    strictly increasing function of the raw time, whenever a batch is processed: raw
    times >= 2 ms apart stay distinct and in order, equal raw times stay equal
    (rounding is half up).

Samples
    ``add_sample(t1, t2, t3, t4)`` (local send, server receive, server send, local
    receive; t1/t4 on the local wall clock) gives an NTP sample at the monotonic
    midpoint ``m``: ``offset = ((t2 - m1) + (t3 - m4)) / 2`` (server minus monotonic)
    and ``delay = (m4 - m1) - (t3 - t2)``. Samples with a negative delay, a delay above
    ``max_delay_ms`` or a jump between t1 and t4 are rejected and counted.

Fit (min-delay filter + robust line)
    Of the samples in the window, only the ``keep_fraction`` with the lowest delay are
    used (the true offset lies within +-delay/2 of a sample, so low delay = low error).
    The drift is the Theil-Sen slope of those samples (median of pairwise slopes,
    weighted by the pair's time span), estimated once they span ``min_drift_span_s``
    (0 before, clamped to +-``max_drift_ppm``); the offset is the median intercept.

Applied correction (slewed)
    A new model never revises a time already handed out: the applied correction is a
    piecewise linear function of monotonic time, frozen up to the newest instant a
    reading was corrected at (a redelivered reading gets the same time again). From
    there a change up to ``slew_max_ms`` is slewed in at ``slew_rate`` (default 5%:
    20 ms take 0.4 s), so the function stays continuous and strictly increasing and
    readings keep their order across model updates; a larger change (a first good
    sample after a bad one) steps. The first model slews likewise from the RTC times
    handed out unsynced when it is close to them; otherwise it covers the past too.

Correction and flags
    With a model, ``ts = applied(m)`` (``m + offset(m)`` once slewed in) and
    ``Quality.TIME_CORRECTED`` is set; ``uncert_ms`` = min delay / 2 + 2 sigma of the
    residuals (MAD) + extrapolation * drift uncertainty + the part not yet slewed in.
    A reading whose regime's RTC is untrusted (implausible year, or a jump not yet
    followed by a sync sample) also gets ``Quality.TIME_ANCHORED``.
    Without a model: a reading of a trusted regime keeps its raw time with
    ``TIME_UNCERTAIN`` (``uncert_ms`` 0 = unknown); an untrusted one is anchored on the
    last trusted regime (last good wall anchor + monotonic elapsed) with
    ``TIME_ANCHORED | TIME_UNCERTAIN``. Raw times that fit no regime (future, or an RTC
    unrelated to the gateway's) are anchored at their arrival, keeping their spacing:
    per device the newest of the batch is placed at arrival, the others that much
    earlier; flags ``TIME_ANCHORED | TIME_UNCERTAIN`` (plus ``TIME_CORRECTED`` with a
    model). ``raw_ts_ms`` always keeps the device's original time.

Unsynced times and restarts
    Every time handed out without a model is ``m + base`` (``base`` = ``wall -
    monotonic`` of the process's first regime, :meth:`TimeCorrector.unsynced_base`), so
    it can be mapped to true time once a model exists (:meth:`TimeCorrector.stamp_map`):
    the uploader holds such readings until then and sends them mapped
    (:mod:`agent.clockjournal`). The samples are kept in the buffer with the boot id of
    the monotonic clock: a restart in the same boot imports them
    (:meth:`TimeCorrector.import_samples`) and corrects from its first reading, even
    when the RTC jumped meanwhile and no ack can come. Otherwise it needs acks to sync
    again: the uploader pings while :meth:`TimeCorrector.wants_samples` is true (until
    the drift is estimated), at once while it holds unsynced readings.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from datetime import UTC, datetime

import msgspec

from pymigrate.clock import Clock
from pymigrate.errors import ConfigError
from pymigrate.types import Quality, Reading

__all__ = ["StampMap", "TimeCorrector", "TimeSyncConfig"]

_TIME_FLAGS = int(Quality.TIME_CORRECTED | Quality.TIME_ANCHORED | Quality.TIME_UNCERTAIN)
_CORRECTED = int(Quality.TIME_CORRECTED)
_ANCHORED = int(Quality.TIME_ANCHORED)
_UNCERTAIN = int(Quality.TIME_UNCERTAIN)
_MAX_REGIMES = 8


class TimeSyncConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[timesync]`` section: clock model and RTC jump detection."""

    enabled: bool = True
    max_samples: int = 64  # samples kept (count bound of the window)
    window_s: float = 4 * 3600.0  # samples older than this go once 3 newer exist
    keep_fraction: float = 0.5  # min-delay filter: share of lowest-delay samples for offset
    delay_factor: float = 2.0  # samples with delay > min * factor + slack are not fitted
    delay_slack_ms: float = 50.0
    max_delay_ms: float = 10_000.0  # round trips above this are rejected outright
    min_drift_span_s: float = 240.0  # estimate drift once fitted samples span this long
    max_drift_ppm: float = 500.0  # clamp of the drift estimate
    drift_uncert_ppm: float = 2.0  # floor of the error of an estimated drift
    drift_target_ppm: float = 50.0  # wants_samples() until the drift error is below this
    unsynced_drift_ppm: float = 200.0  # assumed drift when none is estimated
    step_threshold_ms: float = 2000.0  # wall-vs-monotonic change that counts as a jump
    rtc_slew_ppm: float = 500.0  # max rate wall - monotonic may change without a step (slewing)
    backfill_s: float = 60.0  # readings stamped this long before the first observation fit
    slew_rate: float = 0.05  # a model change is applied at most this fast (ms per ms) ...
    slew_max_ms: float = 128.0  # ... when it is at most this large; larger ones step
    min_year: int = 2020  # RTC times outside [min_year, max_year] are implausible
    max_year: int = 2100
    # readings stamped without a model wait in the buffer for one (sync pings go at
    # once), until this many answers came back without a usable sample; 0: never wait
    hold_answers: int = 3

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool, str]] = [
            ("max_samples", 2 <= self.max_samples <= 4096, "between 2 and 4096"),
            ("window_s", self.window_s > 0, "> 0"),
            ("keep_fraction", 0 < self.keep_fraction <= 1, "in (0, 1]"),
            ("max_delay_ms", self.max_delay_ms > 0, "> 0"),
            ("delay_factor", self.delay_factor >= 1, ">= 1"),
            ("delay_slack_ms", self.delay_slack_ms >= 0, ">= 0"),
            ("min_drift_span_s", self.min_drift_span_s > 0, "> 0"),
            ("max_drift_ppm", self.max_drift_ppm > 0, "> 0"),
            ("drift_uncert_ppm", self.drift_uncert_ppm >= 0, ">= 0"),
            ("drift_target_ppm", self.drift_target_ppm > 0, "> 0"),
            ("unsynced_drift_ppm", self.unsynced_drift_ppm >= 0, ">= 0"),
            ("step_threshold_ms", self.step_threshold_ms > 0, "> 0"),
            ("rtc_slew_ppm", 0 <= self.rtc_slew_ppm <= 100_000, "between 0 and 100000"),
            ("backfill_s", self.backfill_s >= 0, ">= 0"),
            ("slew_rate", 0 < self.slew_rate <= 0.5, "in (0, 0.5]"),
            ("slew_max_ms", self.slew_max_ms >= 0, ">= 0"),
            ("min_year", 1970 <= self.min_year < self.max_year <= 9999,
             "a year >= 1970 below max_year"),
            ("hold_answers", 0 <= self.hold_answers <= 1000, "between 0 and 1000"),
        ]
        for key, ok, what in checks:
            if not ok:
                raise ConfigError(f"timesync.{key}", f"must be {what}, got {getattr(self, key)}")


class StampMap(msgspec.Struct, frozen=True, array_like=True):
    """A clock model as a map of an unsynced time ``ts`` to true time:
    ``v + k * (ts - t0)``, uncertain by ``u0 + |ts - t0| * rate`` (ms)."""

    t0: float
    v: float
    k: float
    u0: float
    rate: float

    def at(self, ts: float) -> int:
        return _round(self.v + self.k * (ts - self.t0))

    def uncert(self, ts: float) -> int:
        return math.ceil(self.u0 + abs(ts - self.t0) * self.rate)


class _Regime:
    """One wall->monotonic relation: ``wall = mono + rmm`` between start and end.

    ``rmm`` is the point estimate used to map readings; ``lo``/``hi`` bound the true
    relation (intersection of the observations' brackets, widened by the slew rate since
    ``seen``). ``rmm`` only moves when an observation proves it wrong, and then only to
    the nearest bound, so read skew cannot make the mapping jitter.
    """

    __slots__ = ("end", "hi", "lo", "plausible", "rmm", "seen", "start", "trusted")

    def __init__(self, lo: float, hi: float, seen: float, start: float, plausible: bool,
                 trusted: bool) -> None:
        self.lo, self.hi, self.seen = lo, hi, seen
        self.rmm = (lo + hi) / 2.0
        self.start = start
        self.end: float | None = None
        self.plausible = plausible
        self.trusted = trusted

    def update(self, lo: float, hi: float, now: float, slew: float) -> bool:
        """Narrow the bounds with one observation bracket; False when it contradicts
        them (a step below the jump threshold or a faster slew: the bounds restart)."""
        widen = slew * max(0.0, now - self.seen)
        self.seen = now
        new_lo, new_hi = max(self.lo - widen, lo), min(self.hi + widen, hi)
        consistent = new_lo <= new_hi
        if not consistent:
            new_lo, new_hi = lo, hi
        self.lo, self.hi = new_lo, new_hi
        self.rmm = min(max(self.rmm, new_lo), new_hi)
        return consistent


class _Model:
    """``server_ms = m + a + b * (m - ref)`` with ``m`` monotonic milliseconds."""

    __slots__ = ("a", "b", "d_min", "drift_err", "ref", "sigma")

    def __init__(self, a: float, b: float, ref: float, d_min: float, sigma: float,
                 drift_err: float | None) -> None:
        self.a, self.b, self.ref = a, b, ref
        self.d_min, self.sigma = d_min, sigma
        self.drift_err = drift_err  # None: drift not estimated (b = 0)

    @property
    def drift_known(self) -> bool:
        return self.drift_err is not None

    def at(self, m: float) -> float:
        return m + self.a + self.b * (m - self.ref)


def _round(x: float) -> int:
    """Half up (``round`` goes half to even: 700.5 and 699.5 would both give 700)."""
    return math.floor(x + 0.5)


_MAX_SEGMENTS = 256  # < 40 kB: times handed out stay fixed over the last 128+ acks


def _year_ms(year: int) -> int:
    return int(datetime(year, 1, 1, tzinfo=UTC).timestamp() * 1000)


def _weighted_median(pairs: list[tuple[float, float]]) -> float:
    pairs.sort()
    half = sum(w for _, w in pairs) / 2.0
    acc = 0.0
    for v, w in pairs:
        acc += w
        if acc >= half:
            return v
    return pairs[-1][0]  # pragma: no cover - float rounding only


def _median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2.0


class TimeCorrector:
    """Clock offset/drift model from ack samples; corrects reading timestamps."""

    def __init__(self, config: TimeSyncConfig, *, clock: Clock) -> None:
        self.config = config
        self._clock = clock
        self._lo_ms = _year_ms(config.min_year)
        self._hi_ms = _year_ms(config.max_year)
        self._regimes: list[_Regime] = []
        self._first: _Regime | None = None  # the process's first regime (see unsynced_base)
        self._last_obs: float = 0.0
        self._samples: list[tuple[float, float, float]] = []  # (m, offset, delay) by m
        self._model: _Model | None = None
        self._dirty = False
        self._dirty_at = 0.0  # monotonic ms of the newest sample
        self._done = -math.inf  # newest monotonic ms a reading was corrected at
        self._done_off: float | None = None  # its ts - m while unsynced (raw RTC time)
        # the correction applied: piecewise linear in monotonic ms, (start, value, slope);
        # a new model changes it only from the moment of its sample on (see _fit)
        self._applied: list[tuple[float, float, float]] = []
        self.counters: dict[str, int] = {
            "samples_accepted": 0, "samples_rejected_delay": 0, "samples_rejected_jump": 0,
            "jumps": 0, "rtc_resets": 0, "backward_steps": 0, "forward_steps": 0,
            "small_steps": 0, "samples_imported": 0,
            "corrected": 0, "anchored": 0, "uncertain": 0,
        }

    # -- samples --------------------------------------------------------------------
    def add_sample(self, t1_local_ms: int, t2_server_recv_ms: int, t3_server_send_ms: int,
                   t4_local_ms: int) -> bool:
        """Add one NTP-style sample from an ack; False when it was rejected."""
        if not self.config.enabled:
            return False
        now = self._observe()
        p1 = self._locate(t1_local_ms, now)
        p4 = self._locate(t4_local_ms, now)
        if p1 is None or p4 is None or p1[1] is not p4[1]:
            self.counters["samples_rejected_jump"] += 1
            return False
        m1, m4 = p1[0], p4[0]
        delay = (m4 - m1) - (t3_server_send_ms - t2_server_recv_ms)
        if delay < 0 or delay > self.config.max_delay_ms or m4 < m1:
            self.counters["samples_rejected_delay"] += 1
            return False
        offset = ((t2_server_recv_ms - m1) + (t3_server_send_ms - m4)) / 2.0
        mid = (m1 + m4) / 2.0
        bisect.insort(self._samples, (mid, offset, delay))
        self._trim(now)
        regime = p4[1]
        regime.trusted = regime.plausible
        self.counters["samples_accepted"] += 1
        self._dirty = True
        self._dirty_at = now
        return True

    def _trim(self, now: float) -> None:
        s = self._samples
        horizon = now - self.config.window_s * 1000.0
        recent = len(s) - bisect.bisect_left(s, (horizon,))
        if recent >= 3:
            del s[: len(s) - recent]
        if len(s) > self.config.max_samples:
            del s[: len(s) - self.config.max_samples]

    # -- model ----------------------------------------------------------------------
    def _fit(self) -> _Model | None:
        if self._dirty:
            self._dirty = False
            self._model = self._build()
            self._apply(self._model)
        return self._model

    def _apply(self, model: _Model) -> None:
        """Make ``model`` the applied correction after the newest instant a reading was
        already corrected at (``_done``): what was handed out is never contradicted. A
        change up to ``slew_max_ms`` is slewed in at ``slew_rate`` from there, so the
        applied function stays continuous and strictly increasing (order is kept)."""
        cfg = self.config
        seg = self._applied
        k = 1.0 + model.b
        u = self._done
        if seg:
            del seg[bisect.bisect_right(seg, (u, math.inf, math.inf)):]
        if not seg and self._done_off is not None:
            # the first model after times were handed out unsynced (the RTC's time):
            # slew from those when the change is small
            delta = u + self._done_off - model.at(u)
            if abs(delta) <= cfg.slew_max_ms:
                seg.append((u, u + self._done_off, 1.0))
        if not seg:  # nothing handed out, or far off: the model covers the past too
            ref = self._dirty_at
            seg.append((ref, model.at(ref), k))
            return
        delta = self._applied_at(u) - model.at(u)
        if 0 < abs(delta) <= cfg.slew_max_ms:
            end = u + abs(delta) / cfg.slew_rate
            seg.append((u, model.at(u) + delta, k - math.copysign(cfg.slew_rate, delta)))
            seg.append((end, model.at(end), k))
        else:
            seg.append((u, model.at(u), k))
        del seg[:-_MAX_SEGMENTS]

    def _applied_at(self, m: float) -> float:
        seg = self._applied
        i = max(0, bisect.bisect_right(seg, (m, math.inf, math.inf)) - 1)
        start, value, slope = seg[i]
        return value + slope * (m - start)

    def _build(self) -> _Model:
        cfg = self.config
        by_delay = sorted(self._samples, key=lambda s: s[2])
        d_min = by_delay[0][2]
        # popcorn filter: a delay far above the minimum means queueing on one leg
        limit = d_min * cfg.delay_factor + cfg.delay_slack_ms
        eligible = [s for s in by_delay if s[2] <= limit]
        k = max(min(len(eligible), 3), math.ceil(cfg.keep_fraction * len(eligible)))
        chosen = sorted(eligible[:k])
        eligible.sort()
        ref = eligible[-1][0]
        span = eligible[-1][0] - eligible[0][0]
        b = 0.0
        drift_err: float | None = None
        if len(eligible) >= 3 and span >= cfg.min_drift_span_s * 1000:
            slopes: list[tuple[float, float]] = []
            for i, (mi, oi, _) in enumerate(eligible):
                for mj, oj, _ in eligible[i + 1:]:
                    dm = mj - mi
                    if dm > 0:
                        slopes.append(((oj - oi) / dm, dm))
            lim = cfg.max_drift_ppm * 1e-6
            b = min(lim, max(-lim, _weighted_median(slopes)))
            detrended = [o - b * (m - ref) for m, o, _ in eligible]
            center = _median(detrended)
            spread = 1.4826 * _median([abs(x - center) for x in detrended])
            # a sample's offset can be off by up to (delay - min delay) / 2 beyond the common
            # bias: the rms of those bounds over the span bounds the slope's error
            bound = math.sqrt(sum((d - d_min) ** 2 for _, _, d in eligible) / len(eligible)) / 2
            drift_err = max(cfg.drift_uncert_ppm * 1e-6, 2.0 * max(spread, bound) / span)
        a = _median([o - b * (m - ref) for m, o, _ in chosen])
        sigma = 1.4826 * _median([abs(o - a - b * (m - ref)) for m, o, _ in chosen])
        return _Model(a, b, ref, d_min, sigma, drift_err)

    def _uncert(self, model: _Model, m: float) -> int:
        rate = (model.drift_err if model.drift_err is not None
                else self.config.unsynced_drift_ppm * 1e-6)
        ext = abs(m - model.ref) * rate
        return math.ceil(model.d_min / 2.0 + 2.0 * model.sigma + ext)

    # -- regimes --------------------------------------------------------------------
    def _plausible(self, wall_ms: float) -> bool:
        return self._lo_ms <= wall_ms < self._hi_ms

    def _observe(self) -> float:
        """Read both clocks; open a new regime on a jump. Returns monotonic ms.

        The wall read is bracketed by two monotonic reads: ``wall - monotonic`` lies in
        ``[wall - m_after - 1, wall + 1 - m_before]`` (1 ms: the wall clock's integer
        resolution) however long the process was preempted between the reads.
        """
        m_a = self._clock.monotonic() * 1000.0
        wall = self._clock.time_ms()
        now = self._clock.monotonic() * 1000.0
        lo, hi = wall - now - 1.0, wall + 1.0 - m_a
        plausible = self._plausible(wall)
        cfg = self.config
        if not self._regimes:
            # readings stamped shortly before the first observation (queued in the source,
            # redelivered after a restart) are of the same boot: they map through it
            start = now - cfg.backfill_s * 1000.0
            self._first = _Regime(lo, hi, now, start, plausible, plausible)
            self._regimes.append(self._first)
        else:
            cur = self._regimes[-1]
            step = (lo + hi) / 2.0 - cur.rmm
            if abs(step) > cfg.step_threshold_ms:
                self.counters["jumps"] += 1
                if cur.plausible and not plausible:
                    self.counters["rtc_resets"] += 1
                elif step < 0:
                    self.counters["backward_steps"] += 1
                else:
                    self.counters["forward_steps"] += 1
                cur.end = now
                # the jump happened after the previous observation: readings may start there
                self._regimes.append(_Regime(lo, hi, now, self._last_obs, plausible, False))
                del self._regimes[:-_MAX_REGIMES]
            else:
                if not cur.update(lo, hi, now, cfg.rtc_slew_ppm * 1e-6):
                    self.counters["small_steps"] += 1  # followed: below the jump threshold
                cur.plausible = plausible
                if not plausible:
                    cur.trusted = False
        self._last_obs = now
        return now

    def _locate(self, wall_ms: int, now: float) -> tuple[float, _Regime] | None:
        slack = self.config.step_threshold_ms / 2.0
        for g in reversed(self._regimes):
            m = wall_ms - g.rmm
            hi = (now if g.end is None else g.end) + slack
            if g.start - slack <= m <= hi:
                return m, g
        return None

    def _anchor(self) -> _Regime | None:
        for g in reversed(self._regimes):
            if g.trusted:
                return g
        return None

    # -- correction -----------------------------------------------------------------
    def correct(self, readings: Sequence[Reading]) -> list[Reading]:
        """Corrected copies of ``readings`` (same order); see the module docstring."""
        if not self.config.enabled:
            return list(readings)
        now = self._observe()
        model = self._fit()
        anchor = self._anchor()
        counters = self.counters
        out: list[Reading] = []
        replace = msgspec.structs.replace
        raws = [r.ts_ms if r.raw_ts_ms is None else r.raw_ts_ms for r in readings]
        locs = [self._locate(raw, now) for raw in raws]
        # readings that fit no regime: a device's newest is anchored at arrival, the
        # others keep their spacing to it (not all at ``now``: distinct stay distinct)
        newest: dict[str, int] = {}
        for r, raw, loc in zip(readings, raws, locs, strict=True):
            if loc is None and raw > newest.get(r.device_id, raw - 1):
                newest[r.device_id] = raw
        for r, raw, loc in zip(readings, raws, locs, strict=True):
            if loc is None:
                m = now - (newest[r.device_id] - raw)
                trusted, flags = False, _ANCHORED | _UNCERTAIN
            else:
                m, trusted, flags = loc[0], loc[1].trusted, 0
            if model is not None:
                applied = self._applied_at(m)
                ts = _round(applied)
                flags |= _CORRECTED | (0 if trusted else _ANCHORED)
                uncert = self._uncert(model, m) + math.ceil(abs(applied - model.at(m)))
                counters["corrected"] += 1
            elif trusted:  # without a model only the first regime is trusted: raw = m + base
                ts, flags, uncert = raw, flags | _UNCERTAIN, 0
                counters["uncertain"] += 1
            elif anchor is not None:
                ts = _round(m + anchor.rmm)
                end = now if anchor.end is None else anchor.end
                uncert = math.ceil(abs(m - end) * self.config.unsynced_drift_ppm * 1e-6
                                   + self.config.step_threshold_ms)
                flags = _ANCHORED | _UNCERTAIN
                counters["anchored"] += 1
            else:
                # every unsynced time is ``m + base`` (see unsynced_base): a model found
                # later can still map it (agent.clockjournal)
                ts, flags, uncert = _round(m + self._base_rmm()), _UNCERTAIN, 0
                counters["uncertain"] += 1
            if loc is not None and m > self._done:
                self._done = m
                if model is None:
                    self._done_off = ts - m
            out.append(replace(r, ts_ms=ts, raw_ts_ms=raw, uncert_ms=uncert,
                               quality=(r.quality & ~_TIME_FLAGS) | flags))
        return out

    # -- unsynced times, persistence --------------------------------------------------
    def _base_rmm(self) -> float:
        assert self._first is not None
        return self._first.rmm

    def unsynced_base(self) -> float | None:
        """``wall - monotonic`` (ms) of this process's first regime (None before the
        clocks were first read). Every time handed out without a model is
        ``m + unsynced_base()`` (``m`` the reading's monotonic time): the RTC's own time
        while it was trusted, anchored on it after a jump. So a model found later (or by
        a later process of the same boot) maps such a time back to true time: see
        :meth:`stamp_map`."""
        return None if self._first is None else self._base_rmm()

    def stamp_map(self, base: float, shift_ms: float = 0.0) -> StampMap | None:
        """The current model as a function of a time handed out unsynced as ``m + base``
        (by this or an earlier process; ``shift_ms`` moves that process's monotonic
        time onto this one's), None while unsynced."""
        model = self._fit()
        if model is None:
            return None
        rate = (model.drift_err if model.drift_err is not None
                else self.config.unsynced_drift_ppm * 1e-6)
        return StampMap(t0=base - shift_ms + model.ref, v=model.ref + model.a,
                        k=1.0 + model.b, u0=model.d_min / 2.0 + 2.0 * model.sigma, rate=rate)

    def plausible(self, wall_ms: float) -> bool:
        """True when ``wall_ms`` lies in [min_year, max_year)."""
        return self._plausible(wall_ms)

    def export_samples(self) -> list[tuple[float, float, float]]:
        """The samples of the current window, (monotonic ms, offset, delay): with the boot
        id they let the next process of this boot start synced (:meth:`import_samples`)."""
        return list(self._samples)

    def import_samples(self, samples: Sequence[tuple[float, float, float]]) -> int:
        """Take samples an earlier process of this boot exported (same monotonic clock);
        returns how many were kept. With them the model exists at once: readings are
        corrected from the first one, whatever the RTC says after a restart."""
        if not self.config.enabled:
            return 0
        now = self._observe()
        good = sorted((float(m), float(o), float(d)) for m, o, d in samples
                      if m <= now and 0 <= d <= self.config.max_delay_ms)
        if not good:
            return 0
        for smp in good:
            bisect.insort(self._samples, smp)
        self._trim(now)
        self._dirty = True
        self._dirty_at = max(self._dirty_at, self._samples[-1][0])
        self.counters["samples_imported"] += len(good)
        return len(good)

    # -- introspection --------------------------------------------------------------
    def synced(self) -> bool:
        """True once at least one good sample is in the model."""
        return self._fit() is not None

    def wants_samples(self) -> bool:
        """True while unsynced or the drift is unknown or worse than
        ``drift_target_ppm``: the uploader should send sync pings (an empty batch) every
        minute or so instead of waiting for data."""
        model = self._fit()
        return (model is None or model.drift_err is None
                or model.drift_err > self.config.drift_target_ppm * 1e-6)

    def now_ms(self) -> int:
        """Best estimate of true time now (the local wall clock when unsynced)."""
        now = self._observe()
        model = self._fit()
        return _round(self._applied_at(now)) if model is not None else self._clock.time_ms()

    def offset_ms(self) -> float | None:
        """Estimated ``true - local wall`` now (NTP sign convention), None when unsynced."""
        now = self._observe()
        model = self._fit()
        if model is None:
            return None
        return self._applied_at(now) - self._clock.time_ms()

    def drift_ppm(self) -> float | None:
        """Estimated rate error of the local clock (+ = runs fast), None until estimated."""
        model = self._fit()
        if model is None or not model.drift_known:
            return None
        return -model.b / (1.0 + model.b) * 1e6

    def status(self) -> dict[str, object]:
        """Health view: state (unsynced / synced / anchored), model and counters."""
        now = self._observe()
        model = self._fit()
        cur = self._regimes[-1]
        state = "unsynced" if model is None else ("synced" if cur.trusted else "anchored")
        return {
            "state": state,
            "rtc_trusted": cur.trusted,
            "samples": len(self._samples),
            "offset_ms": self.offset_ms(),
            "drift_ppm": self.drift_ppm(),
            "uncert_ms": self._uncert(model, now) if model is not None else None,
            **self.counters,
        }
