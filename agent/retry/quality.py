"""Network-quality monitor (EWMA RTT and deviation, success rate, throughput) and AIMD.

The RTT estimator is RFC 6298's (srtt/rttvar); the attempt timeout is
``srtt + k*rttvar`` plus the time the payload needs at the measured throughput.
:class:`Aimd` adapts bytes per batch and batches in flight: additive increase while the
RTT stays within ``mean + k*deviation``, multiplicative decrease on timeouts, throttling
or RTT blow-ups, all bounded by config. A loss-aware cap keeps each attempt's expected
success probability above a target on lossy links (smaller batches survive more often).
"""

from __future__ import annotations

import math

from agent.retry.config import RetryConfig


class NetworkQuality:
    """EWMA of RTT and deviation, success rate and achieved throughput."""

    def __init__(self, *, alpha: float = 0.125, beta: float = 0.25, k: float = 4.0,
                 success_alpha: float = 0.1) -> None:
        self.alpha = alpha
        self.beta = beta
        self.k = k
        self._sa = success_alpha
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.success_rate = 1.0
        self.throughput_bps: float | None = None  # bytes per second
        self.samples = 0
        # EWMA of bytes per attempt (for the loss-per-byte estimate)
        self.mean_attempt_bytes: float | None = None
        # Karn/RFC 6298 5.5: each timeout doubles the next timeout until a success, so a
        # link that recovers losses itself (TCP, CoAP CON) gets the time to do so
        self.timeout_backoff = 1.0

    def rtt_normal(self, rtt: float) -> bool:
        """True while ``rtt <= srtt + k * rttvar`` (or too few samples to judge)."""
        if self.srtt is None or self.samples < 3:
            return True
        return rtt <= self.srtt + self.k * max(self.rttvar, 0.01 * self.srtt)

    def record_success(self, rtt: float, nbytes: int) -> bool:
        """Feed one acked attempt; returns whether its RTT was normal (judged before update)."""
        normal = self.rtt_normal(rtt)
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = (1 - self.beta) * self.rttvar + self.beta * abs(self.srtt - rtt)
            self.srtt = (1 - self.alpha) * self.srtt + self.alpha * rtt
        self.samples += 1
        if rtt > 0:
            tp = nbytes / rtt
            self.throughput_bps = tp if self.throughput_bps is None else (
                0.8 * self.throughput_bps + 0.2 * tp)
        self._outcome(True, nbytes)
        self.timeout_backoff = 1.0
        return normal

    def record_failure(self, nbytes: int, *, timed_out: bool = False) -> None:
        self._outcome(False, nbytes)
        if timed_out:
            self.timeout_backoff = min(16.0, self.timeout_backoff * 2.0)

    def _outcome(self, ok: bool, nbytes: int) -> None:
        self.success_rate = (1 - self._sa) * self.success_rate + self._sa * (1.0 if ok else 0.0)
        self.mean_attempt_bytes = float(nbytes) if self.mean_attempt_bytes is None else (
            (1 - self._sa) * self.mean_attempt_bytes + self._sa * nbytes)

    def timeout(self, nbytes: int, cfg: RetryConfig) -> float:
        """Per-attempt timeout: RTO plus transfer time at the measured throughput, doubled
        per consecutive timeout (Karn), within ``[timeout_min_s, timeout_max_s]``."""
        if self.srtt is None:
            rto = cfg.timeout_initial_s
        else:
            rto = self.srtt + self.k * max(self.rttvar, 0.01)
            if self.throughput_bps:
                rto += nbytes / self.throughput_bps
        return min(cfg.timeout_max_s, max(cfg.timeout_min_s, rto) * self.timeout_backoff)

    def loss_cap_bytes(self, target: float) -> float | None:
        """Largest attempt size whose success probability stays >= ``target``.

        Models loss as independent per byte: ``success = exp(-lam * bytes)``, with ``lam``
        estimated from the success rate at the mean attempt size. None when unknown/lossless.
        """
        if target <= 0 or not self.mean_attempt_bytes or self.success_rate >= 0.999:
            return None
        s = max(self.success_rate, 1e-3)
        lam = -math.log(s) / self.mean_attempt_bytes
        return -math.log(target) / lam


class Aimd:
    """Additive-increase / multiplicative-decrease of batch bytes and batches in flight."""

    def __init__(self, cfg: RetryConfig) -> None:
        self.cfg = cfg
        self.batch_bytes = float(cfg.batch_initial_bytes)
        self.inflight = float(cfg.inflight_initial)
        self.decreases = 0
        self.increases = 0

    @property
    def batch_limit(self) -> int:
        return int(self.batch_bytes)

    @property
    def inflight_limit(self) -> int:
        return int(self.inflight)

    def on_success(self, rtt_normal: bool, *, grow_inflight: bool = True) -> None:
        """Additive increase (``grow_inflight=False`` holds the in-flight count, e.g.
        shortly after the cloud throttled us)."""
        if not rtt_normal:
            self.decrease()
            return
        c = self.cfg
        self.batch_bytes = min(float(c.batch_max_bytes), self.batch_bytes + c.batch_increase_bytes)
        if grow_inflight:
            # +1 in flight per "window" of successes, as TCP's congestion avoidance
            self.inflight = min(float(c.inflight_max),
                                self.inflight + 1.0 / max(self.inflight, 1.0))
        self.increases += 1

    def decrease(self) -> None:
        c = self.cfg
        self.batch_bytes = max(float(c.batch_min_bytes), self.batch_bytes * c.decrease_factor)
        self.inflight = max(float(c.inflight_min), self.inflight * c.decrease_factor)
        self.decreases += 1

    def decrease_inflight(self) -> None:
        """Throttled: halve the batches in flight only (see the uploader)."""
        self.inflight = max(float(self.cfg.inflight_min), self.inflight * self.cfg.decrease_factor)
        self.decreases += 1

    def effective_batch(self, quality: NetworkQuality, overhead: int) -> int:
        """Batch byte limit after the loss-aware cap (never below ``batch_min_bytes``)."""
        limit = self.batch_bytes
        cap = quality.loss_cap_bytes(self.cfg.target_attempt_success)
        if cap is not None:
            limit = min(limit, cap - overhead)
        return int(max(float(self.cfg.batch_min_bytes), limit))
