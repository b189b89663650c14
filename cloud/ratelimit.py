"""Per-device token-bucket limiter for the ingest (``limiter.check(device_id)``).

Each device may send ``batches_per_s`` batches per second with bursts of ``burst``; a
batch over the limit raises :class:`~pymigrate.errors.ThrottledError` whose
``retry_after_s`` is when the next token is due, and the ingest answers ``throttled``
(the agent's retry controller obeys it). Buckets of idle devices are forgotten once more
than ``max_devices`` are tracked (an idle bucket is full, so forgetting it is exact).
"""

from __future__ import annotations

from pymigrate.clock import Clock, WallClock
from pymigrate.errors import ThrottledError

__all__ = ["DeviceRateLimiter"]


class DeviceRateLimiter:
    """Token bucket per device id."""

    def __init__(self, batches_per_s: float, burst: int = 10, *, clock: Clock | None = None,
                 max_devices: int = 200_000) -> None:
        if batches_per_s <= 0 or burst < 1:
            raise ValueError("batches_per_s must be > 0 and burst >= 1")
        self.rate = batches_per_s
        self.burst = float(burst)
        self.clock = clock or WallClock()
        self.max_devices = max_devices
        self._buckets: dict[str, tuple[float, float]] = {}  # device -> (tokens, at)
        self.throttled = 0

    def check(self, device_id: str) -> None:
        """Take one token or raise ThrottledError."""
        now = self.clock.monotonic()
        tokens, at = self._buckets.get(device_id, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens < 1.0:
            self._buckets[device_id] = (tokens, now)
            self.throttled += 1
            raise ThrottledError(f"device {device_id} over {self.rate}/s",
                                 retry_after_s=(1.0 - tokens) / self.rate, device=device_id)
        self._buckets[device_id] = (tokens - 1.0, now)
        if len(self._buckets) > self.max_devices:
            self._forget_idle(now)

    def _forget_idle(self, now: float) -> None:
        full = [d for d, (t, at) in self._buckets.items()
                if t + (now - at) * self.rate >= self.burst]
        for d in full:
            del self._buckets[d]

    def __len__(self) -> int:
        return len(self._buckets)
