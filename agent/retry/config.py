"""Typed, frozen retry/uploader configuration (phase one of the two-phase config).

Every field has a default; validation raises :class:`ConfigError` naming ``retry.<key>``.
"""

from __future__ import annotations

from typing import Any

import msgspec

from pymigrate.configload import convert
from pymigrate.errors import ConfigError

BACKOFF_KINDS = ("full_jitter", "decorrelated")
PROFILES = ("unmetered", "metered", "battery")


def _positive(key: str, value: float, *, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"retry.{key}", f"must be {'>= 0' if zero_ok else '> 0'}, got {value}")


class RetryConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """How the uploader retries, adapts and saves battery. Times in seconds, sizes in bytes."""

    # backoff after a failed attempt (per destination, reset on success)
    backoff: str = "full_jitter"
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 60.0
    seed: int | None = None  # None: device id + os.urandom (never synchronised across a fleet)
    # circuit breaker per destination
    breaker_failures: int = 6  # consecutive failures that open it
    breaker_failure_rate: float = 0.9  # or this failure rate ...
    breaker_window: int = 20  # ... over the last N outcomes
    breaker_min_calls: int = 10  # ... once at least this many are recorded
    breaker_open_base_s: float = 5.0
    breaker_open_cap_s: float = 300.0
    probe_max_bytes: int = 2048  # the half-open probe batch
    # network quality + AIMD
    rtt_alpha: float = 0.125
    rtt_beta: float = 0.25
    rtt_k: float = 4.0  # RTT "normal" while <= mean + k * deviation
    timeout_initial_s: float = 10.0
    timeout_min_s: float = 1.0
    timeout_max_s: float = 60.0
    batch_min_bytes: int = 1024
    batch_initial_bytes: int = 16 * 1024
    batch_max_bytes: int = 256 * 1024
    batch_increase_bytes: int = 2048
    inflight_min: int = 1
    inflight_initial: int = 1
    inflight_max: int = 4
    decrease_factor: float = 0.5
    target_attempt_success: float = 0.85  # loss-aware batch cap; 0 disables
    max_chunks: int = 64
    throttle_jitter: float = 0.1  # fraction added to retry-after, desynchronises a fleet
    reconnect_after_failures: int = 2
    # connectivity windows: "HH:MM-HH:MM" (daily UTC) or cron "M H * * *" (open window_duration_s)
    windows: tuple[str, ...] = ()
    window_duration_s: float = 300.0
    # cost / battery
    profile: str = "unmetered"
    linger_metered_s: float = 300.0
    linger_battery_s: float = 900.0
    low_battery_pct: float = 20.0
    power_file: str = ""
    power_check_s: float = 300.0
    # time sync: while the clock model wants samples, ping (an empty batch) this often
    sync_ping_s: float = 60.0
    # give up, loudly
    # 0 (default): no age limit, every priority is kept until delivered or evicted by the
    # byte budget; > 0: chunks buffered longer (on the buffer's own clock, immune to
    # wall-clock jumps) are given up with an ``expired`` gap record. Per-priority
    # retention lives in ``buffer.retention_s``.
    retention_s: float = 0.0
    max_attempts: int = 0  # 0: unlimited

    def __post_init__(self) -> None:
        if self.backoff not in BACKOFF_KINDS:
            raise ConfigError("retry.backoff", f"unknown policy {self.backoff!r} "
                              f"(expected one of {', '.join(BACKOFF_KINDS)})")
        if self.profile not in PROFILES:
            raise ConfigError("retry.profile", f"unknown profile {self.profile!r} "
                              f"(expected one of {', '.join(PROFILES)})")
        for key in ("backoff_base_s", "backoff_cap_s", "breaker_open_base_s",
                    "breaker_open_cap_s", "timeout_initial_s", "timeout_min_s",
                    "timeout_max_s", "window_duration_s", "power_check_s", "sync_ping_s"):
            _positive(key, getattr(self, key))
        for key in ("linger_metered_s", "linger_battery_s", "retention_s", "max_attempts",
                    "throttle_jitter", "target_attempt_success"):
            _positive(key, getattr(self, key), zero_ok=True)
        for key in ("breaker_failures", "breaker_window", "breaker_min_calls",
                    "probe_max_bytes", "batch_min_bytes", "batch_increase_bytes",
                    "inflight_min", "max_chunks", "reconnect_after_failures"):
            _positive(key, getattr(self, key))
        if self.backoff_cap_s < self.backoff_base_s:
            raise ConfigError("retry.backoff_cap_s", "must be >= backoff_base_s")
        if self.breaker_open_cap_s < self.breaker_open_base_s:
            raise ConfigError("retry.breaker_open_cap_s", "must be >= breaker_open_base_s")
        if not 0 < self.breaker_failure_rate <= 1:
            raise ConfigError("retry.breaker_failure_rate", "must be in (0, 1]")
        if self.breaker_min_calls > self.breaker_window:
            raise ConfigError("retry.breaker_min_calls", "must be <= breaker_window")
        for key in ("rtt_alpha", "rtt_beta", "decrease_factor"):
            if not 0 < getattr(self, key) < 1:
                raise ConfigError(f"retry.{key}", "must be in (0, 1)")
        if self.target_attempt_success >= 1:
            raise ConfigError("retry.target_attempt_success", "must be < 1")
        if self.rtt_k <= 0:
            raise ConfigError("retry.rtt_k", "must be > 0")
        if not self.timeout_min_s <= self.timeout_initial_s <= self.timeout_max_s:
            raise ConfigError("retry.timeout_initial_s",
                              "must lie within [timeout_min_s, timeout_max_s]")
        if not self.batch_min_bytes <= self.batch_initial_bytes <= self.batch_max_bytes:
            raise ConfigError("retry.batch_initial_bytes",
                              "must lie within [batch_min_bytes, batch_max_bytes]")
        if not self.inflight_min <= self.inflight_initial <= self.inflight_max:
            raise ConfigError("retry.inflight_initial",
                              "must lie within [inflight_min, inflight_max]")
        if not 0 <= self.low_battery_pct <= 100:
            raise ConfigError("retry.low_battery_pct", "must be in [0, 100]")
        # imported here: windows imports nothing from config, keeps the module graph flat
        from agent.retry.windows import parse_windows

        parse_windows(self.windows, self.window_duration_s)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, section: str = "retry") -> RetryConfig:
        """Validate a ``[retry]`` TOML table; errors name ``retry.<key>``."""
        return convert(data, cls, section=section)
