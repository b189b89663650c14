"""Circuit breaker per destination: closed -> open -> half-open (one small probe) -> closed.

Opens after ``failures`` consecutive failures or a failure rate over a sliding window of
outcomes. While open it waits out its own backoff (exponential with full jitter, growing
with each consecutive opening). Half-open lets exactly one probe through: success closes
it, failure reopens it. Throttling is *not* a failure: it proves the link works.
"""

from __future__ import annotations

import collections
import enum
import random
from collections.abc import Callable

import structlog

log = structlog.get_logger("agent.retry.breaker")


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


StateListener = Callable[[str, BreakerState, BreakerState], None]


class CircuitBreaker:
    """One destination's breaker. Time is monotonic seconds passed in by the caller."""

    def __init__(self, name: str, *, failures: int, failure_rate: float, window: int,
                 min_calls: int, open_base_s: float, open_cap_s: float,
                 rng: random.Random, on_change: StateListener | None = None) -> None:
        self.name = name
        self._threshold = failures
        self._rate = failure_rate
        self._min_calls = min_calls
        self._outcomes: collections.deque[bool] = collections.deque(maxlen=window)
        self._open_base = open_base_s
        self._open_cap = open_cap_s
        self._rng = rng
        self._on_change = on_change
        self._state = BreakerState.CLOSED
        self._consecutive = 0
        self._opens_in_row = 0
        self._open_until = 0.0
        self._probe_in_flight = False
        self.transitions: collections.Counter[str] = collections.Counter()

    # -- queries ----------------------------------------------------------------------
    def state(self, now: float) -> BreakerState:
        """Current state; an open breaker whose time is up becomes half-open here."""
        if self._state is BreakerState.OPEN and now >= self._open_until:
            self._set(BreakerState.HALF_OPEN)
        return self._state

    @property
    def open_until(self) -> float:
        """Monotonic time at which an open breaker lets a probe through."""
        return self._open_until

    @property
    def probe_in_flight(self) -> bool:
        return self._probe_in_flight

    def allow(self, now: float) -> str | None:
        """``"send"`` (closed), ``"probe"`` (half-open, probe slot free) or None (wait)."""
        st = self.state(now)
        if st is BreakerState.CLOSED:
            return "send"
        if st is BreakerState.HALF_OPEN and not self._probe_in_flight:
            return "probe"
        return None

    # -- events -----------------------------------------------------------------------
    def begin_probe(self) -> None:
        self._probe_in_flight = True

    def record_success(self, *, probe: bool = False) -> None:
        self._outcomes.append(True)
        self._consecutive = 0
        if probe:
            self._probe_in_flight = False
        if self._state is not BreakerState.CLOSED:
            # any answer proves the link again (a probe, or a batch sent before the trip)
            self._opens_in_row = 0
            self._outcomes.clear()
            self._set(BreakerState.CLOSED)

    def record_neutral(self, *, probe: bool = False) -> None:
        """Throttled: the link answered, so it is alive; not counted as a failure."""
        self._consecutive = 0
        if probe:
            self._probe_in_flight = False
            if self._state is BreakerState.HALF_OPEN:
                self._opens_in_row = 0
                self._outcomes.clear()
                self._set(BreakerState.CLOSED)

    def record_aborted(self, *, probe: bool = False) -> None:
        """The attempt was cancelled (shutdown): nothing learnt."""
        if probe:
            self._probe_in_flight = False

    def record_failure(self, now: float, *, probe: bool = False) -> None:
        self._outcomes.append(False)
        self._consecutive += 1
        if probe:
            self._probe_in_flight = False
        if self._state is BreakerState.HALF_OPEN:
            if probe:
                self._trip(now)
            return
        if self._state is BreakerState.OPEN:
            return
        n = len(self._outcomes)
        rate = self._outcomes.count(False) / n if n else 0.0
        if self._consecutive >= self._threshold or (n >= self._min_calls and rate >= self._rate):
            self._trip(now)

    def trip(self, now: float, *, probe: bool = False) -> None:
        """Open now, whatever the counts say (the cloud refused us for a reason a
        resend cannot fix, e.g. our identity): the next attempt is a probe after the
        open period, with the usual growth of that period."""
        self._outcomes.append(False)
        if probe:
            self._probe_in_flight = False
        self._trip(now)

    # -- internals --------------------------------------------------------------------
    def _trip(self, now: float) -> None:
        ceiling = min(self._open_cap, self._open_base * (2.0 ** min(self._opens_in_row, 62)))
        # full jitter, but never shorter than half the ceiling: a dead link is not re-probed
        # at once, and a fleet that lost its cloud together does not come back together
        self._open_until = now + self._rng.uniform(ceiling / 2, ceiling)
        self._opens_in_row += 1
        self._set(BreakerState.OPEN)

    def _set(self, new: BreakerState) -> None:
        old = self._state
        if old is new:
            return
        self._state = new
        self.transitions[f"{old.value}->{new.value}"] += 1
        log.info("retry.breaker", uplink=self.name, old=old.value, new=new.value)
        if self._on_change is not None:
            self._on_change(self.name, old, new)
