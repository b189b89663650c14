"""Adaptive retry controller: backoff with jitter, circuit breaker, network quality + AIMD,
throttling obedience, connectivity windows and a cost/battery profile.

The :class:`agent.uploader.Uploader` drives these; they hold no tasks of their own.
"""

from __future__ import annotations

from agent.retry.backoff import (
    BACKOFFS,
    Backoff,
    DecorrelatedJitterBackoff,
    FullJitterBackoff,
    agent_rng,
    make_backoff,
)
from agent.retry.breaker import BreakerState, CircuitBreaker
from agent.retry.config import BACKOFF_KINDS, PROFILES, RetryConfig
from agent.retry.power import PowerState, parse_power_text
from agent.retry.quality import Aimd, NetworkQuality
from agent.retry.windows import Slot, Windows, parse_window, parse_windows

__all__ = [
    "BACKOFFS",
    "BACKOFF_KINDS",
    "PROFILES",
    "Aimd",
    "Backoff",
    "BreakerState",
    "CircuitBreaker",
    "DecorrelatedJitterBackoff",
    "FullJitterBackoff",
    "NetworkQuality",
    "PowerState",
    "RetryConfig",
    "Slot",
    "Windows",
    "agent_rng",
    "make_backoff",
    "parse_power_text",
    "parse_window",
    "parse_windows",
]
