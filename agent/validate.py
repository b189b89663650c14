"""Reading validation: reject with a counted, logged reason; never drop silently."""

from __future__ import annotations

import collections
import fnmatch
import math
from collections.abc import Callable, Sequence

import structlog

from agent.config import ValidationConfig
from pymigrate.types import Reading

log = structlog.get_logger("pymigrate.agent.validate")

_DAY_MS = 86_400_000
LOG_TEXT_MAX = 120


def shorten(value: object, limit: int = LOG_TEXT_MAX) -> object:
    """``value`` for a log line: text longer than ``limit`` is cut, its length said."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]}... ({len(value)} chars)"
    return value


class Validator:
    """Checks readings against the plausibility rules; counts every rejection by reason.

    ``now_ms`` is the best estimate of true time (the time-sync model's when synced).
    Logging is throttled per reason (first 10, then every 1000th) so a broken sensor at
    1 kHz cannot flood the journal; the counters stay exact.
    """

    def __init__(self, config: ValidationConfig, *, now_ms: Callable[[], int]) -> None:
        self.config = config
        self.now_ms = now_ms
        self.rejected: collections.Counter[str] = collections.Counter()
        self.accepted = 0

    def reject(self, reason: str, **detail: object) -> None:
        """Count (and log, throttled) a rejection found anywhere on the ingest path.

        Text details are cut to :data:`LOG_TEXT_MAX` characters: a 1 MB sensor name or
        topic must not become a 1 MB log line."""
        self.rejected[reason] += 1
        n = self.rejected[reason]
        if n <= 10 or n % 1000 == 0:
            log.warning("reading rejected", reason=reason, count=n,
                        **{k: shorten(v) for k, v in detail.items()})

    def check(self, r: Reading, now: int) -> str | None:
        c = self.config
        if not r.sensor or len(r.sensor) > c.max_sensor_len:
            return "bad_sensor_name"
        if c.strict_sensors and not any(fnmatch.fnmatchcase(r.sensor, p)
                                        for p in c.strict_sensors):
            return "unknown_sensor"
        v = r.value
        if not isinstance(v, float):  # pragma: no cover - Reading is typed; defensive
            return "non_numeric"
        if math.isnan(v) and not c.allow_nan:
            return "nan"
        if math.isinf(v) and not c.allow_nan:
            return "infinite"
        if r.ts_ms > now + int(c.max_future_s * 1000):
            return "timestamp_future"
        if r.ts_ms < now - int(c.max_past_days * _DAY_MS):
            return "timestamp_past"
        return None

    def filter(self, readings: Sequence[Reading]) -> list[Reading]:
        now = self.now_ms()
        out: list[Reading] = []
        for r in readings:
            reason = self.check(r, now)
            if reason is None:
                out.append(r)
            else:
                self.reject(reason, sensor=r.sensor, ts_ms=r.ts_ms, value=repr(r.value))
        self.accepted += len(out)
        return out
