"""The aggregator: routes readings to the first matching rule and runs its windows.

It is synchronous and does no I/O: the pipeline stage calls :meth:`Aggregator.process`
for each batch, sleeps until :meth:`Aggregator.next_deadline_ms` (no polling) and then
calls :meth:`Aggregator.advance`; on a graceful stop it calls :meth:`Aggregator.snapshot`
(state persisted with the buffer) or :meth:`Aggregator.flush` (partial windows sent).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

import msgspec

from agent.aggregate.config import AggregationConfig, RuleConfig, rule_fingerprint, validate
from agent.aggregate.windows import Counters, Handler, SeriesState, Status, build_handler
from pymigrate.clock import Clock
from pymigrate.errors import PyMigrateError
from pymigrate.types import Reading

__all__ = ["AggregatorStats", "Aggregator", "SnapshotError"]

SNAPSHOT_VERSION = 1
_MATCH_CACHE_MAX = 65_536

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder()


class SnapshotError(PyMigrateError):
    """A persisted window-state snapshot could not be read (version or format)."""

    reason = "snapshot"


class AggregatorStats(msgspec.Struct, frozen=True):
    """Counters since start. ``aggregation_ratio`` = readings out / readings in (lower is
    better: 0.05 means 95% fewer readings went upstream than came in)."""

    readings_in: int
    readings_out: int
    raw_passed: int
    aggregates_out: int
    windows_closed: int
    partial_windows: int
    late: int
    late_raw: int
    late_dropped: int
    suppressed: int
    unmatched: int
    open_series: int
    aggregation_ratio: float


class _Rule:
    __slots__ = ("cfg", "handler", "idx", "name")

    def __init__(self, idx: int, cfg: RuleConfig, counters: Counters) -> None:
        self.idx = idx
        self.cfg = cfg
        self.name = cfg.rule_name
        self.handler: Handler = build_handler(cfg, counters)


class Aggregator:
    """Edge aggregation under :class:`AggregationConfig` (see the package docstring)."""

    def __init__(self, config: AggregationConfig, *, clock: Clock) -> None:
        validate(config)
        self.config = config
        self._clock = clock
        self._c = Counters()
        self._rules = [_Rule(i, r, self._c) for i, r in enumerate(config.rules)]
        self._match_cache: dict[str, _Rule | None] = {}
        self._series: dict[tuple[int, str, str], SeriesState] = {}

    # ---- routing ------------------------------------------------------------------------

    def rule_for(self, sensor: str) -> RuleConfig | None:
        """The first rule whose pattern matches ``sensor`` (None: the reading passes raw)."""
        rule = self._match(sensor)
        return rule.cfg if rule is not None else None

    def _match(self, sensor: str) -> _Rule | None:
        try:
            return self._match_cache[sensor]
        except KeyError:
            pass
        found = None
        for rule in self._rules:
            if any(fnmatch.fnmatchcase(sensor, p) for p in rule.cfg.patterns):
                found = rule
                break
        if len(self._match_cache) >= _MATCH_CACHE_MAX:
            self._match_cache.clear()
        self._match_cache[sensor] = found
        return found

    def _state(self, rule: _Rule, r: Reading) -> SeriesState:
        key = (rule.idx, r.device_id, r.sensor)
        st = self._series.get(key)
        if st is None:
            st = self._series[key] = SeriesState(r.device_id, r.sensor)
        return st

    # ---- the stage API ------------------------------------------------------------------

    def process(self, readings: Sequence[Reading]) -> list[Reading]:
        """Absorb readings; returns what to forward now: raw passes (rule ``pass_raw``,
        deadband/threshold sends, late readings under ``late_policy = "raw"``, readings no
        rule matches) and the aggregates of windows the readings closed (event time)."""
        out: list[Reading] = []
        c = self._c
        for r in readings:
            c.readings_in += 1
            rule = self._match(r.sensor)
            if rule is None:
                c.unmatched += 1
                c.raw_passed += 1
                out.append(r)
                continue
            status, passed = rule.handler.on_reading(self._state(rule, r), r, out)
            late = status is not Status.OK
            if late:
                c.late += 1
            if passed:
                continue
            if rule.cfg.pass_raw:
                rule.handler.em.raw(out, r, late=late)
            elif late:
                if rule.cfg.late_policy == "raw":
                    c.late_raw += 1
                    rule.handler.em.raw(out, r, late=True)
                else:
                    c.late_dropped += 1
        return out

    def advance(self, now_ms: int | None = None) -> list[Reading]:
        """Wall time is ``now_ms`` (default: the clock): close windows whose end plus the
        allowed lateness has passed and send due deadband heartbeats."""
        if not self.config.wall_clock_close:
            return []
        now = self._clock.time_ms() if now_ms is None else now_ms
        out: list[Reading] = []
        for (idx, _, _), st in self._series.items():
            h = self._rules[idx].handler
            d = h.deadline(st)
            if d is not None and d <= now:
                h.on_time(st, now, out)
        return out

    def next_deadline_ms(self) -> int | None:
        """Earliest wall time (ms) at which :meth:`advance` will emit something, or None."""
        if not self.config.wall_clock_close:
            return None
        best: int | None = None
        for (idx, _, _), st in self._series.items():
            d = self._rules[idx].handler.deadline(st)
            if d is not None and (best is None or d < best):
                best = d
        return best

    def flush(self) -> list[Reading]:
        """Graceful stop without persisted state: emit every open window now, marked
        partial (``AggInfo.rule`` ends in ``~partial``), and forget all window state."""
        out: list[Reading] = []
        for (idx, _, _), st in self._series.items():
            self._rules[idx].handler.flush(st, out)
        self._series.clear()
        return out

    # ---- persistence --------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """Window state as bytes. Store it atomically with the readings :meth:`process`
        returned (same buffer transaction): then a restart neither loses nor double-counts."""
        rules = {r.name: rule_fingerprint(r.cfg).decode() for r in self._rules}
        series = [[self._rules[idx].name, dev, sensor, st.dump()]
                  for (idx, dev, sensor), st in self._series.items()]
        return _enc.encode({"v": SNAPSHOT_VERSION, "rules": rules, "series": series})

    def restore(self, data: bytes) -> list[Reading]:
        """Load a :meth:`snapshot`. State of rules that are gone or changed is emitted now
        as partial windows (returned) rather than mixed into windows of a different rule."""
        try:
            doc: Any = _dec.decode(data)
            if not isinstance(doc, dict) or doc.get("v") != SNAPSHOT_VERSION:
                raise SnapshotError("unsupported aggregation snapshot version",
                                    version=doc.get("v") if isinstance(doc, dict) else None)
            old_rules: dict[str, str] = doc["rules"]
            by_name = {r.name: r for r in self._rules}
            stale: dict[str, Handler] = {}
            out: list[Reading] = []
            for name, dev, sensor, dumped in doc["series"]:
                st = SeriesState.load(dev, sensor, dumped)
                rule = by_name.get(name)
                old_fp = old_rules[name]
                if rule is not None and rule_fingerprint(rule.cfg).decode() == old_fp:
                    self._series[(rule.idx, dev, sensor)] = st
                    continue
                if name not in stale:
                    old_cfg = msgspec.json.decode(old_fp, type=RuleConfig)
                    stale[name] = build_handler(old_cfg, self._c)
                stale[name].flush(st, out)
        except (msgspec.DecodeError, msgspec.ValidationError, KeyError, TypeError,
                ValueError, IndexError) as exc:
            raise SnapshotError(f"corrupt aggregation snapshot: {exc}") from exc
        return out

    # ---- observability ------------------------------------------------------------------

    def stats(self) -> AggregatorStats:
        """Counters: readings in/out, raw passed, aggregates out, late (raw/dropped)..."""
        c = self._c
        out = c.raw_passed + c.aggregates_out
        return AggregatorStats(
            readings_in=c.readings_in, readings_out=out, raw_passed=c.raw_passed,
            aggregates_out=c.aggregates_out, windows_closed=c.windows_closed,
            partial_windows=c.partial_windows, late=c.late, late_raw=c.late_raw,
            late_dropped=c.late_dropped, suppressed=c.suppressed, unmatched=c.unmatched,
            open_series=len(self._series),
            aggregation_ratio=(out / c.readings_in) if c.readings_in else 0.0)
