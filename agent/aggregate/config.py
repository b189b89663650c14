"""Aggregation rules, parsed from TOML ``[[aggregation.rules]]`` into frozen typed structs.

Example::

    [[aggregation.rules]]
    name = "alarms"
    match = ["alarm_*", "door_*"]
    window = { type = "raw" }               # pass unchanged (first match wins)

    [[aggregation.rules]]
    name = "boiler"
    match = "boiler_temp"
    window = { type = "threshold", low = 10.0, high = 90.0, size_s = 600 }
    functions = ["min", "max", "avg", "count"]
    raw_priority = "critical"               # excursion readings go up raw, first

    [[aggregation.rules]]
    name = "weather10m"
    match = "*"
    window = { type = "tumbling", size_s = 600 }
    functions = ["min", "max", "avg", "count", "stddev", "p95"]
    allowed_lateness_s = 30
    late_policy = "raw"

Parsing validates only (phase one); :class:`agent.aggregate.Aggregator` builds the state.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

import msgspec

from pymigrate.configload import convert
from pymigrate.errors import ConfigError
from pymigrate.types import Priority

__all__ = [
    "AggregationConfig",
    "CountWindow",
    "DeadbandWindow",
    "HoppingWindow",
    "RawWindow",
    "RuleConfig",
    "SessionWindow",
    "ThresholdWindow",
    "TumblingWindow",
    "WindowConfig",
    "parse_aggregation",
    "parse_rule",
    "rule_fingerprint",
]

_Pos = Annotated[float, msgspec.Meta(gt=0)]
_NonNeg = Annotated[float, msgspec.Meta(ge=0)]


class _Base(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="type"):
    pass


class TumblingWindow(_Base, frozen=True, tag="tumbling"):
    """Fixed, non-overlapping windows of ``size_s`` aligned to the Unix epoch."""

    size_s: _Pos


class HoppingWindow(_Base, frozen=True, tag="hopping"):
    """Windows of ``size_s`` starting every ``hop_s`` (overlapping when hop < size)."""

    size_s: _Pos
    hop_s: _Pos


class CountWindow(_Base, frozen=True, tag="count"):
    """Every ``count`` readings of a series (arrival order) form one window."""

    count: Annotated[int, msgspec.Meta(ge=1)]


class SessionWindow(_Base, frozen=True, tag="session"):
    """A window lasts while readings keep coming less than ``gap_s`` apart."""

    gap_s: _Pos


class DeadbandWindow(_Base, frozen=True, tag="deadband"):
    """Report by exception: send a reading when it moves more than ``abs`` or ``percent``
    (of the last sent value) away from the last sent value, and at least every
    ``heartbeat_s`` (0 = no heartbeat)."""

    abs: _NonNeg | None = None
    percent: _NonNeg | None = None
    heartbeat_s: _NonNeg = 0.0


class ThresholdWindow(_Base, frozen=True, tag="threshold"):
    """Readings outside ``[low, high]`` (an excursion) pass raw, plus the first reading
    back in band; with ``size_s`` > 0 every reading is also aggregated in tumbling windows."""

    low: float | None = None
    high: float | None = None
    size_s: _NonNeg = 0.0


class RawWindow(_Base, frozen=True, tag="raw"):
    """No aggregation: matching readings pass unchanged (an exclusion before a catch-all)."""


WindowConfig = (TumblingWindow | HoppingWindow | CountWindow | SessionWindow | DeadbandWindow
                | ThresholdWindow | RawWindow)

BASIC_FUNCTIONS = frozenset({
    "min", "max", "sum", "count", "avg", "mean", "first", "last",
    "stddev", "variance", "stddev_pop", "variance_pop",
})
_PCT_RE = re.compile(r"^p(\d{1,2}(?:\.\d+)?)$")


def percentile_of(fn: str) -> float | None:
    """``"p95"`` -> 0.95, ``"p99.9"`` -> 0.999; None when ``fn`` is not a percentile."""
    m = _PCT_RE.match(fn)
    if not m:
        return None
    q = float(m.group(1)) / 100.0
    return q if 0.0 < q < 1.0 else None


class RuleConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One aggregation rule. ``match`` is an fnmatch glob (or a list of globs) on the sensor."""

    match: str | list[str]
    window: WindowConfig
    name: str = ""
    functions: list[str] = msgspec.field(default_factory=list)
    pass_raw: bool = False
    allowed_lateness_s: _NonNeg = 0.0
    late_policy: Literal["raw", "drop"] = "raw"
    lttb: Annotated[int, msgspec.Meta(ge=0)] = 0
    priority: str = "normal"
    raw_priority: str | None = None
    percentile_rel_error: Annotated[float, msgspec.Meta(gt=0, lt=0.5)] = 0.01

    @property
    def patterns(self) -> list[str]:
        return [self.match] if isinstance(self.match, str) else list(self.match)

    @property
    def rule_name(self) -> str:
        """The explicit name, or one derived from the window (``tumbling600s``)."""
        if self.name:
            return self.name
        w = self.window
        if isinstance(w, TumblingWindow | SessionWindow):
            size = w.size_s if isinstance(w, TumblingWindow) else w.gap_s
            return f"{_tag(w)}{_num(size)}s"
        if isinstance(w, HoppingWindow):
            return f"hopping{_num(w.size_s)}s{_num(w.hop_s)}s"
        if isinstance(w, CountWindow):
            return f"count{w.count}"
        return _tag(w)


class AggregationConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The ``[aggregation]`` section. No rules = every reading passes raw.

    ``wall_clock_close``: close quiet windows once wall time passes their end plus the
    allowed lateness (turn off when replaying historical timestamps in real time).
    ``degrade``: the coarse rule the buffer uses for degrade-before-drop (optional).
    """

    rules: list[RuleConfig] = msgspec.field(default_factory=list)
    wall_clock_close: bool = True
    degrade: RuleConfig | None = None


def _tag(w: object) -> str:
    return str(getattr(type(w), "__struct_config__").tag)  # noqa: B009


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def rule_fingerprint(rule: RuleConfig) -> bytes:
    """A stable encoding of a rule: window state is only reused under an identical rule."""
    return msgspec.json.encode(rule)


def _check_rule(rule: RuleConfig, key: str) -> None:
    w = rule.window
    if not rule.patterns or any(not p for p in rule.patterns):
        raise ConfigError(f"{key}.match", "needs at least one non-empty sensor pattern")
    for fld in ("priority", "raw_priority"):
        val = getattr(rule, fld)
        if val is not None:
            try:
                Priority.parse(val)
            except ValueError as exc:
                raise ConfigError(f"{key}.{fld}", str(exc)) from exc
    for i, fn in enumerate(rule.functions):
        if fn not in BASIC_FUNCTIONS and percentile_of(fn) is None:
            raise ConfigError(
                f"{key}.functions[{i}]",
                f"unknown function {fn!r} (known: {', '.join(sorted(BASIC_FUNCTIONS))}, "
                "pNN percentiles such as p50, p99.9)")
    if len(set(rule.functions)) != len(rule.functions):
        raise ConfigError(f"{key}.functions", "lists a function twice")
    if isinstance(w, HoppingWindow):
        if w.hop_s > w.size_s:
            raise ConfigError(f"{key}.window.hop_s",
                              "must not exceed size_s (gaps between windows)")
        if w.size_s / w.hop_s > 1000:
            raise ConfigError(f"{key}.window.hop_s", "more than 1000 windows per reading")
    for fld in ("size_s", "hop_s", "gap_s"):
        v = getattr(w, fld, None)
        if v and abs(v * 1000 - round(v * 1000)) > 1e-6:
            raise ConfigError(f"{key}.window.{fld}", "must be a whole number of milliseconds")
    if isinstance(w, DeadbandWindow):
        if w.abs is None and w.percent is None:
            raise ConfigError(f"{key}.window", "deadband needs abs and/or percent")
        if rule.functions or rule.lttb:
            raise ConfigError(f"{key}.functions", "a deadband rule sends readings, not functions")
    elif isinstance(w, ThresholdWindow):
        if w.low is None and w.high is None:
            raise ConfigError(f"{key}.window", "threshold needs low and/or high")
        if w.low is not None and w.high is not None and not w.low < w.high:
            raise ConfigError(f"{key}.window.low", "must be below high")
        if any(v is not None and not math.isfinite(v) for v in (w.low, w.high)):
            raise ConfigError(f"{key}.window", "low/high must be finite")
        if w.size_s and not rule.functions:
            raise ConfigError(f"{key}.functions", "size_s given: name the functions to compute")
        if rule.lttb:
            raise ConfigError(f"{key}.lttb", "not available on threshold rules")
    elif isinstance(w, RawWindow):
        if rule.functions or rule.lttb:
            raise ConfigError(f"{key}.functions", "a raw rule computes nothing")
    else:
        if not rule.functions and not rule.lttb:
            raise ConfigError(f"{key}.functions", "name at least one function or set lttb")
        if rule.lttb and rule.lttb < 3:
            raise ConfigError(f"{key}.lttb", "needs at least 3 points per window (or 0 = off)")
        if rule.lttb and isinstance(w, HoppingWindow):
            raise ConfigError(f"{key}.lttb", "not available on hopping windows")


def parse_rule(data: dict[str, Any], *, key: str = "aggregation.degrade") -> RuleConfig:
    """Parse and check one rule (e.g. the buffer's coarse degrade rule)."""
    rule = convert(data, RuleConfig, section=key)
    _check_rule(rule, key)
    return rule


def parse_aggregation(data: dict[str, Any] | None, *,
                      section: str = "aggregation") -> AggregationConfig:
    """Parse the ``[aggregation]`` table; a bad rule raises ConfigError naming its key,
    e.g. ``aggregation.rules[2].window.size_s``."""
    cfg = convert(dict(data or {}), AggregationConfig, section=section)
    validate(cfg, section=section)
    return cfg


def validate(cfg: AggregationConfig, *, section: str = "aggregation") -> None:
    """The checks a type cannot express (hop <= size, known functions, unique names...)."""
    seen: dict[str, int] = {}
    for i, rule in enumerate(cfg.rules):
        key = f"{section}.rules[{i}]"
        _check_rule(rule, key)
        name = rule.rule_name
        if name in seen:
            raise ConfigError(f"{key}.name",
                              f"rule name {name!r} already used by rules[{seen[name]}]")
        seen[name] = i
    if cfg.degrade is not None:
        _check_rule(cfg.degrade, f"{section}.degrade")
        if not isinstance(cfg.degrade.window, TumblingWindow):
            raise ConfigError(f"{section}.degrade.window", "must be tumbling")
