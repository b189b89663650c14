"""Pacing: shrink the notification rate and the next wave when the cloud ingest pushes back.

Two inputs, both O(1):

* back-pressure reports from the ingest (queue lag above ``max_ingest_lag_s`` or
  throttling) halve a factor, which then recovers linearly over ``recover_s``;
* the ingest budget: a device uploads its buffered backlog after an update, so notifying
  ``r`` devices per second adds about ``r * mean_backlog`` bytes/s of catch-up load; the
  rate is capped so that stays under ``ingest_budget_bytes_per_s``.
"""

from __future__ import annotations

from cloud.fleet.spec import Pacing


class Pacer:
    """Effective rate factor in ``[min_factor, 1]``."""

    def __init__(self, cfg: Pacing) -> None:
        self.cfg = cfg
        self._floor = 1.0  # factor right after the last back-pressure report
        self._t = 0.0  # time of that report
        self.backpressure_events = 0

    def report(self, now: float, *, lag_s: float = 0.0, throttled: bool = False) -> None:
        """Ingest status: lag over the limit or throttling halves the factor."""
        if throttled or lag_s > self.cfg.max_ingest_lag_s:
            self._floor = max(self.cfg.min_factor, self.backpressure_factor(now) * 0.5)
            self._t = now
            self.backpressure_events += 1

    def backpressure_factor(self, now: float) -> float:
        """Back-pressure factor, recovering linearly after the last report."""
        if self._floor >= 1.0:
            return 1.0
        rec = (now - self._t) / self.cfg.recover_s if self.cfg.recover_s > 0 else 1.0
        return min(1.0, self._floor + rec)

    def budget_rate_per_s(self, mean_backlog_bytes: float) -> float:
        """Highest notification rate (devices/s) whose catch-up uploads fit the budget."""
        if self.cfg.ingest_budget_bytes_per_s <= 0 or mean_backlog_bytes <= 0:
            return float("inf")
        return self.cfg.ingest_budget_bytes_per_s / mean_backlog_bytes

    def rate_per_s(self, base_per_min: float, now: float, mean_backlog_bytes: float) -> float:
        """Effective notifications per second."""
        # a bucket of one token lets one extra notification through in any 60 s window:
        # pace at (limit - 1)/min so no sliding minute ever exceeds the limit
        base = max(1.0, base_per_min - 1.0) / 60.0
        rate = min(base, self.budget_rate_per_s(mean_backlog_bytes))
        return max(base * self.cfg.min_factor, rate * self.backpressure_factor(now))

    def factor(self, base_per_min: float, now: float, mean_backlog_bytes: float) -> float:
        """Effective rate over the configured rate: also scales the next wave."""
        base = max(1.0, base_per_min - 1.0) / 60.0
        return self.rate_per_s(base_per_min, now, mean_backlog_bytes) / base
