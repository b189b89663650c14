"""Backoff policies with jitter: exponential full jitter and decorrelated jitter.

Each agent owns a seeded RNG (:func:`agent_rng`): seeded from the device id *and*
``os.urandom`` by default, so two agents started at the same instant never retry in step.
"""

from __future__ import annotations

import hashlib
import os
import random
from typing import Protocol


def agent_rng(device_id: str, seed: int | None = None) -> random.Random:
    """A per-agent RNG. ``seed`` makes it reproducible (tests, simulations)."""
    if seed is not None:
        material = f"{device_id}:{seed}".encode()
    else:
        material = device_id.encode() + os.urandom(16)
    return random.Random(int.from_bytes(hashlib.blake2b(material, digest_size=8).digest(), "big"))


class Backoff(Protocol):
    """Delay before the next attempt after ``failures`` consecutive failures."""

    def next_delay(self) -> float:
        """Record one more failure and return how long to wait, seconds."""
        ...

    def reset(self) -> None:
        """Success: the next failure starts from the base again."""
        ...

    @property
    def failures(self) -> int: ...


class FullJitterBackoff:
    """``uniform(0, min(cap, base * 2**n))`` (AWS "full jitter")."""

    def __init__(self, base_s: float, cap_s: float, rng: random.Random) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self._rng = rng
        self._n = 0

    @property
    def failures(self) -> int:
        return self._n

    def next_delay(self) -> float:
        ceiling = min(self.cap_s, self.base_s * (2.0 ** min(self._n, 62)))
        self._n += 1
        return self._rng.uniform(0.0, ceiling)

    def reset(self) -> None:
        self._n = 0


class DecorrelatedJitterBackoff:
    """``min(cap, uniform(base, prev * 3))`` (AWS "decorrelated jitter")."""

    def __init__(self, base_s: float, cap_s: float, rng: random.Random) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self._rng = rng
        self._prev = base_s
        self._n = 0

    @property
    def failures(self) -> int:
        return self._n

    def next_delay(self) -> float:
        self._n += 1
        self._prev = min(self.cap_s, self._rng.uniform(self.base_s, self._prev * 3.0))
        return self._prev

    def reset(self) -> None:
        self._n = 0
        self._prev = self.base_s


BACKOFFS: dict[str, type[FullJitterBackoff] | type[DecorrelatedJitterBackoff]] = {
    "full_jitter": FullJitterBackoff,
    "decorrelated": DecorrelatedJitterBackoff,
}


def make_backoff(kind: str, base_s: float, cap_s: float, rng: random.Random) -> Backoff:
    """Pick a policy by name (``full_jitter`` or ``decorrelated``)."""
    try:
        cls = BACKOFFS[kind]
    except KeyError:
        raise ValueError(f"unknown backoff {kind!r} (known: {', '.join(BACKOFFS)})") from None
    return cls(base_s, cap_s, rng)
