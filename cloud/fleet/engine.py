"""The rollout engine: a synchronous, I/O-free core driven by device events and timers.

One :class:`Rollout` holds compact per-device state (bytes and small-int arrays, about
16 bytes per target device) and a heap of deadlines (device timeouts, soak ends, offline
deadlines). Nothing scans the fleet periodically: each device event costs O(1) (plus a
heap push), a timer fires only when due, and gates are decided from per-wave state
counters maintained on every transition. Side effects go through :class:`Effects`
(send a notification, persist a transition), so the same engine runs under the asyncio
coordinator, the dry-run simulator and the benchmark.

Times are wall-clock epoch seconds (floats) so persisted deadlines survive a restart.
"""

from __future__ import annotations

import heapq
import math
from array import array
from collections import deque
from collections.abc import Iterable
from typing import Protocol

import msgspec

from cloud.fleet.pacing import Pacer
from cloud.fleet.protocol import Health
from cloud.fleet.registry import Registry
from cloud.fleet.spec import RolloutSpec, WavePlan, first_wave, next_open, next_wave, window_open
from cloud.fleet.states import APPLIED, DeviceState, InvalidTransition, allowed

S = DeviceState
NOWAVE = 0xFFFF
_TIMEOUT, _SOAK, _OFFLINE = 0, 1, 2
_NSTATES = len(DeviceState)
_FAILS = (S.FAILED, S.TIMED_OUT, S.REJECTED)
_PENDING = (S.NOTIFIED, S.IN_PROGRESS, S.SOAKING)

RUNNING, PAUSED, ROLLING_BACK = "running", "paused", "rolling_back"
COMPLETED, ROLLED_BACK, CANCELLED = "completed", "rolled_back", "cancelled"
DONE_STATUSES = frozenset({COMPLETED, ROLLED_BACK, CANCELLED})


class Effects(Protocol):
    """What the engine asks its host to do."""

    def notify(self, rollout: Rollout, idx: int, op: str, attempt: int) -> None:
        """Send ``op`` (apply / rollback) to registry device ``idx``."""

    def transition(self, rollout: Rollout, idx: int, src: int, dst: int, attempt: int,
                   reason: str, now: float) -> None:
        """Persist and count one state transition."""

    def changed(self, rollout: Rollout) -> None:
        """Rollout-level state (status, waves) changed: persist it."""


class Wave(msgspec.Struct):
    """One wave: positions ``[start, end)`` of the rollout's target order."""

    index: int
    start: int
    end: int
    started_at: float
    planned: int
    gate: str = "open"  # open | passed | failed | forced


class Rollout:
    """Runtime state of one rollout."""

    def __init__(self, spec: RolloutSpec, registry: Registry, targets: Iterable[int],
                 effects: Effects, pacer: Pacer, *, now: float,
                 plan: WavePlan | None = None) -> None:
        self.spec = spec
        self.id = spec.rollout_id
        self.reg = registry
        self.effects = effects
        self.pacer = pacer
        self.targets = array("I", targets)
        n = self.n = len(self.targets)
        self.pos_of = array("i", [-1]) * len(registry)
        for pos, idx in enumerate(self.targets):
            self.pos_of[idx] = pos
        self.plan = plan or spec.plan
        self.state = bytearray(n)  # all QUEUED
        self.attempts = bytearray(n)
        self.gen = array("I", [0]) * n
        self.wave_of = array("H", [NOWAVE]) * n
        self.prog = bytearray(n)  # last reported progress, percent (0..100)
        self._pver = 0  # bumped by every transition / progress report
        self._pcache: dict[tuple[int, int], tuple[int, float]] = {}
        self.counts = [0] * _NSTATES
        self.counts[S.QUEUED] = n
        self.waves: list[Wave] = []
        self.wcounts: list[list[int]] = []
        self.offline: list[set[int]] = []
        self.cursor = 0
        self.status = RUNNING
        self.reason = ""
        self.created_at = now
        self.finished_at = 0.0
        self.ready: deque[int] = deque()
        self.heap: list[tuple[float, int, int, int]] = []
        self.tokens = 1.0
        self._t_tokens = now
        self._next_dispatch = now
        self.notifications = 0
        self.stale = 0
        # rollback (abort) bookkeeping
        self.rb_order = array("I")
        self.rb_waves: list[tuple[int, int]] = []
        self.rb_ready: deque[int] = deque()
        self.rb_ok = self.rb_fail = 0
        self.rb_pending = 0

    # -- helpers --------------------------------------------------------------------
    def owns(self, idx: int) -> bool:
        """True when registry device ``idx`` is a target of this rollout."""
        return idx < len(self.pos_of) and self.pos_of[idx] >= 0

    def device_state(self, idx: int) -> DeviceState:
        """State of registry device ``idx`` in this rollout."""
        return DeviceState(self.state[self.pos_of[idx]])

    @property
    def in_flight(self) -> int:
        """Devices busy with a job (notified, in progress, rolling back)."""
        c = self.counts
        return c[S.NOTIFIED] + c[S.IN_PROGRESS] + c[S.ROLLING_BACK]

    @property
    def done(self) -> bool:
        """True once the rollout reached a final status."""
        return self.status in DONE_STATUSES

    def _set(self, pos: int, dst: int, now: float, reason: str = "") -> None:
        src = self.state[pos]
        if not allowed(src, dst):
            raise InvalidTransition(self.reg.ids[self.targets[pos]], S(src), S(dst))
        self.state[pos] = dst
        self._pver += 1
        self.counts[src] -= 1
        self.counts[dst] += 1
        w = self.wave_of[pos]
        if w != NOWAVE:
            wc = self.wcounts[w]
            wc[src] -= 1
            wc[dst] += 1
        self.effects.transition(self, self.targets[pos], src, dst, self.attempts[pos], reason,
                                now)

    def _arm(self, pos: int, at: float, kind: int) -> None:
        g = self.gen[pos] = (self.gen[pos] + 1) & 0xFFFFFFFF
        heapq.heappush(self.heap, (at, kind, pos, g))

    def _disarm(self, pos: int) -> None:
        self.gen[pos] = (self.gen[pos] + 1) & 0xFFFFFFFF

    # -- waves ----------------------------------------------------------------------
    def start(self, now: float) -> None:
        """Start the first wave (a fresh rollout)."""
        if not self.waves and self.n:
            self._start_wave(now)
        self._check_done(now)

    def _start_wave(self, now: float) -> None:
        prev = self.waves[-1].planned if self.waves else 0
        planned = (first_wave(self.n, self.plan, self.spec.gate.min_executed)
                   if not self.waves else next_wave(prev, self.plan))
        factor = self.pacer.factor(self.spec.max_notifications_per_min, now,
                                   self._mean_backlog())
        size = max(1, min(self.n - self.cursor, math.floor(planned * min(1.0, factor))))
        w = len(self.waves)
        wave = Wave(w, self.cursor, self.cursor + size, now, planned)
        self._open_wave(wave, now)
        self.effects.changed(self)

    def _open_wave(self, wave: Wave, now: float) -> None:
        """Register a wave (new, or restored after a restart) and queue its devices."""
        w = wave.index
        self.waves.append(wave)
        wc = [0] * _NSTATES
        self.wcounts.append(wc)
        self.offline.append(set())
        for pos in range(wave.start, wave.end):
            self.wave_of[pos] = w
            st = self.state[pos]
            wc[st] += 1
            if st == S.QUEUED:
                self.ready.append(pos)
        self.cursor = max(self.cursor, wave.end)
        heapq.heappush(self.heap, (wave.started_at + self.spec.offline_wait_s, _OFFLINE, w, 0))

    def _mean_backlog(self) -> float:
        return self.reg.mean_backlog()

    def _sample(self, w: int) -> tuple[int, int, int]:
        """(succeeded, failed, pending) for the gate of wave ``w``; the whole rollout so
        far when the wave alone is smaller than the gate's minimum."""
        wc, off = self.wcounts[w], len(self.offline[w])
        succ = wc[S.SUCCEEDED]
        fail = wc[S.FAILED] + wc[S.TIMED_OUT] + wc[S.REJECTED]
        pending = wc[S.QUEUED] - off + wc[S.NOTIFIED] + wc[S.IN_PROGRESS] + wc[S.SOAKING]
        if succ + fail + pending >= self.spec.gate.min_executed or w == 0:
            return succ, fail, pending
        c = self.counts
        off = sum(len(o) for o in self.offline)
        queued = c[S.QUEUED] - (self.n - self.cursor) - off
        return (c[S.SUCCEEDED], c[S.FAILED] + c[S.TIMED_OUT] + c[S.REJECTED],
                queued + c[S.NOTIFIED] + c[S.IN_PROGRESS] + c[S.SOAKING])

    def gate_verdict(self, w: int) -> str:
        """``pass``, ``fail``, ``insufficient`` or ``wait`` for wave ``w`` right now.

        Decided as soon as the outcome is certain: pass when even if every pending
        device failed the success rate would hold; fail when even if every pending one
        succeeded it would not.
        """
        g = self.spec.gate
        succ, fail, pending = self._sample(w)
        executed = succ + fail
        sample = executed + pending
        if sample >= g.min_executed and sample > 0:
            if (succ + pending) / sample < g.success_threshold:
                return "fail"
            if executed >= g.min_executed and succ / sample >= g.success_threshold:
                return "pass"
            if (g.advance_fraction < 1.0 and executed >= g.min_executed
                    and executed >= g.advance_fraction * sample
                    and succ / executed >= g.success_threshold):
                return "pass"
        if pending == 0 and not self.offline[w]:
            return "insufficient"
        return "wait"

    def _after_event(self, pos: int, now: float) -> None:
        w = self.wave_of[pos]
        if w != NOWAVE:
            self._evaluate(w, now)
        self._check_done(now)

    def _evaluate(self, w: int, now: float) -> None:
        if self.status != RUNNING:
            return
        gate = self.waves[w].gate
        if gate == "passed" and self.spec.gate.advance_fraction < 1.0:
            # passed early on part of the wave: keep watching the rest of it
            if self.gate_verdict(w) == "fail":
                self._gate_failed(w, "fail", now)
            return
        if w != len(self.waves) - 1 or gate != "open":
            return
        verdict = self.gate_verdict(w)
        if verdict == "pass":
            self.waves[w].gate = "passed"
            if self.cursor < self.n:
                self._start_wave(now)
            else:
                self.effects.changed(self)
        elif verdict in ("fail", "insufficient"):
            self._gate_failed(w, verdict, now)

    def _gate_failed(self, w: int, verdict: str, now: float) -> None:
        self.waves[w].gate = "failed"
        self.reason = "gate_failed" if verdict == "fail" else "insufficient_evidence"
        if self.spec.gate.on_fail == "abort" and verdict == "fail":
            self.abort(now, reason=self.reason)
        else:
            self.status = PAUSED
            self.effects.changed(self)

    def _check_done(self, now: float) -> None:
        if self.status == RUNNING and self.cursor >= self.n and self.waves \
                and self.waves[-1].gate in ("passed", "forced"):
            c = self.counts
            if c[S.QUEUED] + c[S.NOTIFIED] + c[S.IN_PROGRESS] + c[S.SOAKING] == 0:
                self.status = COMPLETED
                self.finished_at = now
                self.effects.changed(self)

    # -- operator actions -----------------------------------------------------------
    def pause(self, reason: str = "operator") -> None:
        """Stop notifying new devices; devices in flight finish."""
        if self.status == RUNNING:
            self.status, self.reason = PAUSED, reason
            self.effects.changed(self)

    def resume(self, now: float) -> None:
        """Continue a paused rollout; after a failed gate this overrides it."""
        if self.status != PAUSED:
            return
        self.status, self.reason = RUNNING, ""
        if self.waves and self.waves[-1].gate == "failed":
            self.waves[-1].gate = "forced"
            if self.cursor < self.n:
                self._start_wave(now)
        elif self.waves:
            self._evaluate(len(self.waves) - 1, now)
        self.effects.changed(self)
        self._check_done(now)

    def cancel(self, now: float) -> None:
        """Stop for good: queued devices stay queued, in-flight ones finish."""
        if not self.done:
            self.status, self.reason, self.finished_at = CANCELLED, "cancelled", now
            self.ready.clear()
            self.effects.changed(self)

    def abort(self, now: float, reason: str = "aborted") -> None:
        """Abort and roll back every device that may have applied the change, in waves.

        Also valid on a completed or cancelled rollout (undo it)."""
        if self.status in (ROLLING_BACK, ROLLED_BACK):
            return
        self.status, self.reason = ROLLING_BACK, reason
        self.ready.clear()
        # ROLLING_BACK only occurs here when resuming an interrupted rollback
        self.rb_order = array("I", (p for p in range(self.n)
                                    if self.state[p] in APPLIED
                                    or self.state[p] == S.ROLLING_BACK))
        self.rb_waves = []
        self._next_rb_wave(now)
        self.effects.changed(self)

    def _next_rb_wave(self, now: float) -> None:
        start = self.rb_waves[-1][1] if self.rb_waves else 0
        if start >= len(self.rb_order):
            self.status, self.finished_at = ROLLED_BACK, now
            self.effects.changed(self)
            return
        plan = self.spec.rollback_plan
        size = first_wave(len(self.rb_order), plan) if not self.rb_waves else next_wave(
            self.rb_waves[-1][1] - self.rb_waves[-1][0], plan)
        end = min(len(self.rb_order), start + size)
        self.rb_waves.append((start, end))
        self.rb_ok = self.rb_fail = 0
        self.rb_pending = end - start
        self.rb_ready.extend(self.rb_order[start:end])

    def _rb_finished(self, ok: bool, now: float) -> None:
        if ok:
            self.rb_ok += 1
        else:
            self.rb_fail += 1
        self.rb_pending -= 1
        if self.rb_pending == 0 and self.status == ROLLING_BACK:
            total = self.rb_ok + self.rb_fail
            if total and self.rb_ok / total < self.spec.gate.success_threshold:
                self.status, self.reason = PAUSED, "rollback_gate_failed"
                self.effects.changed(self)
            else:
                self._next_rb_wave(now)

    # -- dispatch -------------------------------------------------------------------
    def next_deadline(self) -> float:
        """Earliest time the engine needs :meth:`tick` (inf when only events can help)."""
        t = self.heap[0][0] if self.heap else math.inf
        return min(t, self._next_dispatch)

    def _rate(self, now: float) -> float:
        return self.pacer.rate_per_s(self.spec.max_notifications_per_min, now,
                                     self._mean_backlog())

    def dispatch(self, now: float) -> None:
        """Notify as many queued devices as in-flight, rate and window limits allow."""
        self._next_dispatch = math.inf
        rb = self.status == ROLLING_BACK
        if self.status != RUNNING and not rb:
            return
        q = self.rb_ready if rb else self.ready
        if not q:
            return
        if not window_open(self.spec.windows, now):
            self._next_dispatch = next_open(self.spec.windows, now)
            return
        rate = self._rate(now)
        self.tokens = min(1.0, self.tokens + (now - self._t_tokens) * rate)
        self._t_tokens = now
        limit = self.spec.max_in_flight
        in_flight = self.in_flight
        while q and in_flight < limit and self.tokens >= 0.999999:
            pos = q.popleft()
            if rb:
                if self._send_rollback(pos, now):
                    in_flight += 1
                    self.tokens -= 1.0
                continue
            if self.state[pos] != S.QUEUED:
                continue
            idx = self.targets[pos]
            if not self.reg.online[idx]:
                self._went_offline(pos, now)
                continue
            self._set(pos, S.NOTIFIED, now)
            self._arm(pos, now + self.spec.device_timeout_s, _TIMEOUT)
            self.effects.notify(self, idx, "apply", self.attempts[pos])
            self.notifications += 1
            in_flight += 1
            self.tokens -= 1.0
        if q and in_flight < limit:
            # at least 1 ms: epoch-second floats cannot represent smaller steps
            self._next_dispatch = now + max(1e-3, (1.0 - self.tokens) / rate)

    def _went_offline(self, pos: int, now: float) -> None:
        w = self.wave_of[pos]
        if now >= self.waves[w].started_at + self.spec.offline_wait_s:
            self._set(pos, S.SKIPPED, now, "offline")
            self._after_event(pos, now)
        else:
            self.offline[w].add(pos)
            self._evaluate(w, now)

    def _send_rollback(self, pos: int, now: float) -> bool:
        st = self.state[pos]
        if st == S.ROLLING_BACK:  # resumed after a restart: ask again (idempotent)
            self._arm(pos, now + self.spec.device_timeout_s, _TIMEOUT)
            self.effects.notify(self, self.targets[pos], "rollback", self.attempts[pos])
            self.notifications += 1
            return True
        if st not in APPLIED:
            self._rb_finished(st == S.ROLLED_BACK, now)
            return False
        self._disarm(pos)
        self._set(pos, S.ROLLING_BACK, now, self.reason)
        self._arm(pos, now + self.spec.device_timeout_s, _TIMEOUT)
        self.effects.notify(self, self.targets[pos], "rollback", self.attempts[pos])
        self.notifications += 1
        return True

    # -- timers ---------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Fire every timer due at ``now``, then dispatch."""
        heap = self.heap
        while heap and heap[0][0] <= now:
            _, kind, pos, g = heapq.heappop(heap)
            if kind == _OFFLINE:
                self._offline_deadline(pos, now)
            elif self.gen[pos] == g:
                if kind == _TIMEOUT:
                    self._timeout(pos, now)
                else:
                    self._soaked(pos, now)
        self.dispatch(now)

    def _timeout(self, pos: int, now: float) -> None:
        st = self.state[pos]
        if st == S.ROLLING_BACK:
            self._set(pos, S.FAILED, now, "rollback_timeout")
            self._rb_finished(False, now)
            return
        if st not in (S.NOTIFIED, S.IN_PROGRESS):
            return
        self._set(pos, S.TIMED_OUT, now, "timeout")
        if self.spec.retry_timeouts:
            self._maybe_retry(pos, now)
        self._after_event(pos, now)

    def _maybe_retry(self, pos: int, now: float) -> None:
        if self.status == RUNNING and self.attempts[pos] < self.spec.max_retries:
            self.attempts[pos] += 1
            self._set(pos, S.QUEUED, now, "retry")
            self.ready.append(pos)

    def _soaked(self, pos: int, now: float) -> None:
        if self.state[pos] == S.SOAKING:
            self._set(pos, S.SUCCEEDED, now)
            self._after_event(pos, now)

    def _offline_deadline(self, w: int, now: float) -> None:
        if w >= len(self.offline):
            return
        skipped = self.offline[w]
        self.offline[w] = set()
        for pos in skipped:
            if self.state[pos] == S.QUEUED:
                self._set(pos, S.SKIPPED, now, "offline")
        if skipped:
            self._evaluate(w, now)
            self._check_done(now)

    # -- device events (O(1) each) --------------------------------------------------
    def on_start(self, idx: int, attempt: int, now: float) -> None:
        """The device accepted and started the job."""
        pos = self.pos_of[idx]
        if self.state[pos] == S.NOTIFIED and attempt == self.attempts[pos]:
            self._set(pos, S.IN_PROGRESS, now)
        else:
            self.stale += 1

    def on_result(self, idx: int, status: str, attempt: int, now: float, *,
                  retriable: bool = False, reason: str = "",
                  health: Health | None = None) -> None:
        """Outcome of an apply or a rollback reported by the device."""
        pos = self.pos_of[idx]
        st = self.state[pos]
        if st == S.ROLLING_BACK:
            if status in ("rolled_back", "rollback_failed"):
                self._disarm(pos)
                ok = status == "rolled_back"
                self._set(pos, S.ROLLED_BACK if ok else S.FAILED, now, reason)
                self._rb_finished(ok, now)
            else:
                self.stale += 1
            return
        if st == S.SOAKING and status in ("failed", "rolled_back"):
            self._disarm(pos)
            self._set(pos, S.FAILED, now, reason or "post_update_check")
            self._after_event(pos, now)
            return
        if st not in (S.NOTIFIED, S.IN_PROGRESS) or attempt != self.attempts[pos]:
            self.stale += 1
            return
        self._disarm(pos)
        if status == "succeeded":
            if health is not None and not self._healthy(health):
                self._set(pos, S.FAILED, now, "unhealthy")
            else:
                self._set(pos, S.SOAKING, now)
                self._arm(pos, now + self.spec.soak_s, _SOAK)
        elif status == "rejected":
            self._set(pos, S.REJECTED, now, reason or "rejected")
        else:
            self._set(pos, S.FAILED, now, reason or "failed")
            if retriable:
                self._maybe_retry(pos, now)
        self._after_event(pos, now)

    def _healthy(self, h: Health) -> bool:
        g = self.spec.gate
        return h.ok and h.error_rate <= g.max_error_rate and (
            g.max_lag_s <= 0 or h.lag_s <= g.max_lag_s)

    def on_health(self, idx: int, health: Health, now: float) -> None:
        """A health report from a target device: bad health during the soak fails it."""
        pos = self.pos_of[idx]
        if self.state[pos] == S.SOAKING and not self._healthy(health):
            self._disarm(pos)
            self._set(pos, S.FAILED, now, "soak_unhealthy")
            self._after_event(pos, now)

    def on_online(self, idx: int, now: float) -> None:
        """A device that was skipped over as offline came back: queue it again."""
        pos = self.pos_of[idx]
        w = self.wave_of[pos]
        if w != NOWAVE and pos in self.offline[w]:
            self.offline[w].discard(pos)
            self.ready.appendleft(pos)

    def on_pull(self, idx: int, now: float) -> str | None:
        """A (re)connected device asks for pending work; returns the op re-sent."""
        pos = self.pos_of[idx]
        st = self.state[pos]
        if st in (S.NOTIFIED, S.IN_PROGRESS):
            self.effects.notify(self, idx, "apply", self.attempts[pos])
            return "apply"
        if st == S.ROLLING_BACK:
            self.effects.notify(self, idx, "rollback", self.attempts[pos])
            return "rollback"
        self.on_online(idx, now)
        return None

    def on_progress(self, idx: int, progress: float) -> bool:
        """Record a device's reported progress (0..1, clamped); True when it changed."""
        pos = self.pos_of[idx]
        pct = max(0, min(100, round(progress * 100))) if math.isfinite(progress) else 0
        if self.prog[pos] == pct:
            return False
        self.prog[pos] = pct
        self._pver += 1
        return True

    def device_progress(self, idx: int) -> float:
        """Progress of device ``idx`` (0..1): 1 once it reported success, else its last
        reported progress."""
        pos = self.pos_of[idx]
        if self.state[pos] in (S.SOAKING, S.SUCCEEDED):
            return 1.0
        return self.prog[pos] / 100.0

    def mean_progress(self, start: int = 0, end: int | None = None) -> float:
        """Mean progress (0..1) of target positions ``[start, end)``: O(devices) once per
        change, cached until the next transition or progress report (status scrapes)."""
        end = self.n if end is None else end
        if end <= start:
            return 0.0
        hit = self._pcache.get((start, end))
        if hit is not None and hit[0] == self._pver:
            return hit[1]
        done = (S.SOAKING, S.SUCCEEDED)
        total = sum(100 if self.state[p] in done else self.prog[p] for p in range(start, end))
        value = round(total / (100.0 * (end - start)), 4)
        self._pcache[(start, end)] = (self._pver, value)
        return value

    # -- restore --------------------------------------------------------------------
    def restore(self, rows: Iterable[tuple[int, int, int, float]], waves: list[Wave],
                status: str, reason: str, now: float) -> None:
        """Rebuild after a restart from persisted ``(idx, state, attempts, since)`` rows
        and waves; re-arms timeouts and soaks from the persisted state-entry times."""
        since = {}
        for idx, st, att, t in rows:
            pos = self.pos_of[idx]
            if pos < 0:
                continue
            self.counts[self.state[pos]] -= 1
            self.state[pos] = st
            self.counts[st] += 1
            self.attempts[pos] = att
            since[pos] = t
        self._pver += 1
        for wave in waves:
            self._open_wave(wave, wave.started_at)
        self.status, self.reason = status, reason
        for pos, t in since.items():
            st = self.state[pos]
            if st in (S.NOTIFIED, S.IN_PROGRESS):
                self._arm(pos, t + self.spec.device_timeout_s, _TIMEOUT)
            elif st == S.SOAKING:
                self._arm(pos, t + self.spec.soak_s, _SOAK)
        if status == ROLLING_BACK:
            self.status = RUNNING  # abort() recomputes the rollback set from states
            self.abort(now, reason)
        elif status == RUNNING and self.waves:
            self._evaluate(len(self.waves) - 1, now)
            self._check_done(now)

    # -- progress -------------------------------------------------------------------
    def progress(self, now: float) -> dict[str, object]:
        """Per-wave and per-state counts, rates, ETA (see :mod:`cloud.fleet.progress`)."""
        from cloud.fleet.progress import rollout_progress

        return rollout_progress(self, now)
