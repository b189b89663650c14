"""Rollout specification, wave plans (explicit or derived from a deadline), windows.

Specs are frozen msgspec structs; :func:`parse_spec` builds one from a dict (TOML/JSON)
and names the offending key on error (:class:`~pymigrate.errors.ConfigError`).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import msgspec

from cloud.fleet.protocol import JobDocument
from pymigrate.configload import convert
from pymigrate.errors import ConfigError


class WavePlan(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Canary (count, or percent of the target when ``canary`` is 0), growth, max wave."""

    canary: int = 0
    canary_pct: float = 1.0
    growth: float = 4.0
    max_wave: int = 0  # 0 = unlimited


class Gate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Wave health gate. ``max_error_rate``/``max_lag_s`` define bad health during soak."""

    success_threshold: float = 0.95
    min_executed: int = 10
    on_fail: Literal["pause", "abort"] = "abort"
    max_error_rate: float = 0.05
    max_lag_s: float = 0.0  # 0 = not checked
    #: 1.0: advance only when the outcome is certain (even if every pending device failed
    #: the wave would pass). Below 1.0 (default 0.5): also advance once this fraction of
    #: the wave has executed at the threshold; a passed wave stays watched and fails the
    #: rollout if it can no longer reach the threshold.
    advance_fraction: float = 0.5


class Pacing(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Back-pressure and ingest budget rules for the notification rate and wave size."""

    ingest_budget_bytes_per_s: float = 0.0  # 0 = no budget
    max_ingest_lag_s: float = 30.0
    min_factor: float = 0.1
    recover_s: float = 300.0  # time to recover from factor 0 to 1 after back-pressure


class Window(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Daily maintenance window in UTC, ``HH:MM``-``HH:MM`` (may wrap midnight);
    ``days`` restricts it to weekdays (0 = Monday) of the window start."""

    start: str
    end: str
    days: list[int] = []


class RolloutSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Everything a rollout needs. ``deadline_s`` > 0 derives the wave plan."""

    rollout_id: str
    group: str = "all"
    document: JobDocument = JobDocument()
    plan: WavePlan = WavePlan()
    deadline_s: float = 0.0
    expected_update_s: float = 300.0  # slowest expected update, used to derive plans
    # in flight = notified + updating: >= rate x longest update, or it caps the rate
    max_in_flight: int = 5000
    max_notifications_per_min: int = 1000
    device_timeout_s: float = 600.0
    max_retries: int = 2
    retry_timeouts: bool = True
    soak_s: float = 120.0
    gate: Gate = Gate()
    rollback_plan: WavePlan = WavePlan(canary=10, growth=4.0)
    windows: list[Window] = []
    offline_wait_s: float = 1800.0
    pacing: Pacing = Pacing()


def parse_spec(data: dict[str, Any]) -> RolloutSpec:
    """Typed spec from a dict; :class:`ConfigError` names the bad key."""
    spec = convert(data, RolloutSpec, section="rollout")
    validate(spec)
    return spec


def validate(spec: RolloutSpec) -> None:
    """Check ranges that types cannot express."""
    checks = [
        ("plan.growth", spec.plan.growth >= 1.0, "must be >= 1"),
        ("plan.canary_pct", 0 < spec.plan.canary_pct <= 100, "must be in (0, 100]"),
        ("gate.success_threshold", 0 <= spec.gate.success_threshold <= 1, "must be in [0, 1]"),
        ("gate.advance_fraction", 0 < spec.gate.advance_fraction <= 1, "must be in (0, 1]"),
        ("max_in_flight", spec.max_in_flight >= 1, "must be >= 1"),
        ("max_notifications_per_min", spec.max_notifications_per_min >= 1, "must be >= 1"),
        ("device_timeout_s", spec.device_timeout_s > 0, "must be > 0"),
        ("soak_s", spec.soak_s >= 0, "must be >= 0"),
        ("max_retries", 0 <= spec.max_retries <= 250, "must be in [0, 250]"),
    ]
    for key, ok, problem in checks:
        if not ok:
            raise ConfigError(f"rollout.{key}", problem)
    for i, w in enumerate(spec.windows):
        for part in ("start", "end"):
            try:
                _hhmm(getattr(w, part))
            except ValueError as exc:
                raise ConfigError(f"rollout.windows[{i}].{part}", str(exc)) from exc


def first_wave(n: int, plan: WavePlan, min_size: int = 1) -> int:
    """Size of the canary wave for a target of ``n`` devices; at least ``min_size`` (the
    gate's minimum of executed devices: a smaller canary could never pass on its own)."""
    size = plan.canary if plan.canary > 0 else math.ceil(n * plan.canary_pct / 100.0)
    return max(1, min(n, max(size, min_size))) if n else 0


def next_wave(prev_planned: int, plan: WavePlan) -> int:
    """Planned size of the wave after one of ``prev_planned`` devices."""
    size = max(prev_planned + 1, math.ceil(prev_planned * plan.growth))
    return min(size, plan.max_wave) if plan.max_wave > 0 else size


def wave_sizes(n: int, plan: WavePlan) -> list[int]:
    """The full list of wave sizes (no pacing shrink) covering ``n`` devices."""
    out: list[int] = []
    left = n
    size = first_wave(n, plan)
    while left > 0:
        take = min(size, left)
        out.append(take)
        left -= take
        size = next_wave(size, plan)
    return out


def predict_seconds(n: int, plan: WavePlan, spec: RolloutSpec) -> float:
    """Rough duration. Each wave: notification time at the rate cap plus one slow update
    and the soak (the gate needs nearly the whole wave). The last wave also waits for
    the slowest outcome: hung devices (timeout x attempts) or offline ones (the wait)."""
    rate_s = spec.max_notifications_per_min / 60.0
    sizes = wave_sizes(n, plan)
    if not sizes:
        return 0.0
    per = [size / rate_s + spec.expected_update_s + spec.soak_s for size in sizes]
    attempts = 1 + (spec.max_retries if spec.retry_timeouts else 0)
    tail = max(spec.expected_update_s + spec.soak_s, spec.device_timeout_s * attempts,
               spec.offline_wait_s)
    return sum(per[:-1]) + sizes[-1] / rate_s + tail


DEADLINE_HEADROOM = 0.85


def derive_plan(n: int, spec: RolloutSpec) -> tuple[WavePlan, bool]:
    """Most cautious wave plan (most waves, smallest growth) that fits ``deadline_s``.

    Returns ``(plan, feasible)``; when nothing fits, the fastest plan and False.
    """
    base = spec.plan
    best: WavePlan | None = None
    for growth in (1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0, 1e9):
        plan = WavePlan(canary=base.canary, canary_pct=base.canary_pct, growth=growth,
                        max_wave=base.max_wave)
        # 15 % headroom: the estimate ignores retries queueing behind the last wave
        if predict_seconds(n, plan, spec) <= DEADLINE_HEADROOM * spec.deadline_s:
            return plan, True
        best = plan
    assert best is not None
    return best, False


def effective_plan(n: int, spec: RolloutSpec) -> WavePlan:
    """The plan a rollout of ``n`` devices runs with."""
    return derive_plan(n, spec)[0] if spec.deadline_s > 0 else spec.plan


def _hhmm(text: str) -> int:
    h, _, m = text.partition(":")
    if not (h.isdigit() and m.isdigit()) or not (0 <= int(h) <= 24 and 0 <= int(m) < 60):
        raise ValueError(f"{text!r} is not HH:MM")
    return int(h) * 60 + int(m)


def window_open(windows: list[Window], t: float) -> bool:
    """True when wall time ``t`` (epoch seconds) is inside a window (no windows: always)."""
    return not windows or next_open(windows, t) <= t


def next_open(windows: list[Window], t: float) -> float:
    """Earliest wall time >= ``t`` inside a window (``t`` itself when open)."""
    if not windows:
        return t
    day = int(t // 86400)
    best = math.inf
    for w in windows:
        start, end = _hhmm(w.start), _hhmm(w.end)
        length = (end - start) % 1440 or 1440
        for d in (day - 1, day, day + 1, day + 2, day + 3, day + 4, day + 5, day + 6, day + 7):
            weekday = (d + 3) % 7  # 1970-01-01 was a Thursday
            if w.days and weekday not in w.days:
                continue
            lo = d * 86400 + start * 60
            hi = lo + length * 60
            if lo <= t < hi:
                return t
            if lo > t:
                best = min(best, lo)
    return best
