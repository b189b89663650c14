"""Dry run: simulate a rollout plan against a fleet model on virtual time.

A discrete-event simulation drives the real engine (:class:`~cloud.fleet.core.FleetCore`)
with simulated devices: each device has an update duration, may be offline (and may come
back), may fail (report failure, hang until the timeout, or turn unhealthy during the
soak) and has a buffered backlog it uploads after the update. Device state is a few
bytes per device in arrays; one heap orders device events and engine deadlines.
Predicts duration, peak notification and catch-up ingest rates, and gate behaviour.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from array import array
from collections import deque
from typing import Any

import msgspec

from cloud.fleet.core import FleetCore
from cloud.fleet.engine import Rollout
from cloud.fleet.protocol import Health, JobResult, JobStart, JobUpdate
from cloud.fleet.registry import Registry
from cloud.fleet.spec import RolloutSpec
from cloud.fleet.states import TERMINAL, DeviceState

_START, _RESULT, _HEALTH, _ONLINE, _RB = range(5)
_OK, _FAILS, _HANGS, _SICK = range(4)  # device behaviours
_EPOCH = 1_767_225_600.0  # 2026-01-01T00:00:00Z: simulated wall time starts here
_DONE = frozenset(TERMINAL - {DeviceState.SKIPPED})


class FleetModel(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What the simulated fleet looks like."""

    devices: int = 10_000
    online_fraction: float = 0.95
    offline_return_fraction: float = 0.5  # offline devices that come back during the run
    offline_return_max_s: float = 3600.0
    update_min_s: float = 60.0
    update_max_s: float = 300.0
    failure_rate: float = 0.02
    rollback_s: float = 30.0
    backlog_bytes: int = 200_000  # buffered data each device uploads after its update
    catchup_s: float = 60.0  # over which the backlog is uploaded
    seed: int = 1


class SimResult(msgspec.Struct):
    """Predicted figures of one simulated rollout."""

    status: str
    reason: str
    simulated_minutes_to_complete: float
    #: until the last device that was reached finished (excludes the offline wait)
    simulated_minutes_to_last_update: float
    devices: int
    states: dict[str, int]
    waves: int
    wave_sizes: list[int]
    gate_verdicts: list[str]
    rollback_waves: int
    peak_notifications_per_minute: int
    peak_ingest_bytes_per_s: float
    transitions: int
    notifications: int
    wall_seconds: float
    #: simulated minutes from the start to the start of each wave
    wave_start_minutes: list[float] = []
    #: the limit that bounds the duration, with each limit's lower bound in minutes
    bound_by: str = ""
    limits_minutes: dict[str, float] = {}


class _Effects:
    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.transitions = 0
        self.last_done = 0.0

    def notify(self, rollout: Rollout, idx: int, op: str, attempt: int) -> None:
        self.sim._notified(rollout, idx, op, attempt)

    def transition(self, rollout: Rollout, idx: int, src: int, dst: int, attempt: int,
                   reason: str, now: float) -> None:
        self.transitions += 1
        if dst in _DONE:
            self.last_done = now

    def changed(self, rollout: Rollout) -> None:
        pass


class Simulation:
    """A simulated fleet plus a coordinator core, advanced event by event."""

    def __init__(self, model: FleetModel) -> None:
        self.model = model
        rnd = random.Random(model.seed)
        n = model.devices
        self.registry = Registry()
        self.effects = _Effects(self)
        self.core = FleetCore(self.registry, self.effects)
        self.behaviour = bytearray(n)
        self.duration = array("f", [0.0]) * n
        self.heap: list[tuple[float, int, int, int, int]] = []
        self._seq = 0
        self.now = _EPOCH
        regions = ("eu", "us", "ap")
        f = model.failure_rate
        for i in range(n):
            online = rnd.random() < model.online_fraction
            self.registry.add(f"dev-{i:06d}", {"region": regions[i % 3], "hardware": "gw2",
                                               "firmware": "1.0"}, online=online)
            self.registry.report(i, Health(backlog_bytes=model.backlog_bytes, online=online),
                                 0)
            u = rnd.random()
            self.behaviour[i] = (_OK if u >= f else _FAILS if u < f * 0.5
                                 else _HANGS if u < f * 0.75 else _SICK)
            self.duration[i] = rnd.uniform(model.update_min_s, model.update_max_s)
            if not online and rnd.random() < model.offline_return_fraction:
                self._push(self.now + rnd.uniform(0, model.offline_return_max_s), _ONLINE, i)
        self._notify_times: deque[float] = deque()
        self.peak_notify = 0
        self._updates: deque[float] = deque()
        self._peak_updates = 0

    def _push(self, t: float, kind: int, idx: int, attempt: int = 0) -> None:
        self._seq += 1
        heapq.heappush(self.heap, (t, self._seq, kind, idx, attempt))

    def _notified(self, rollout: Rollout, idx: int, op: str, attempt: int) -> None:
        now = self.now
        q = self._notify_times
        q.append(now)
        while q[0] <= now - 60.0:
            q.popleft()
        self.peak_notify = max(self.peak_notify, len(q))
        if not self.registry.online[idx]:
            return
        if op == "rollback":
            self._push(now + self.model.rollback_s, _RB, idx, attempt)
            return
        self._push(now + 1.0, _START, idx, attempt)
        b = self.behaviour[idx]
        if b != _HANGS:
            self._push(now + float(self.duration[idx]), _RESULT, idx, attempt)

    def _device_event(self, kind: int, idx: int, attempt: int) -> None:
        dev = self.registry.ids[idx]
        r = self._rollout
        now = self.now
        if kind == _ONLINE:
            self.core.handle(dev, JobStart(dev), now)  # pull on reconnect
        elif kind == _START:
            self.core.handle(dev, JobStart(dev, r.id, attempt), now)
        elif kind == _RB:
            self.core.handle(dev, JobResult(dev, r.id, "rolled_back", attempt), now)
        elif kind == _RESULT:
            b = self.behaviour[idx]
            if b == _FAILS:
                self.core.handle(dev, JobResult(dev, r.id, "failed", attempt,
                                                reason="apply_failed"), now)
                return
            self.core.handle(dev, JobResult(dev, r.id, "succeeded", attempt,
                                            health=Health()), now)
            m = self.model
            # catch-up upload of the backlog after the update, spread over catchup_s:
            # the ingest rate is (updates in the last catchup_s) * backlog / catchup_s
            q = self._updates
            q.append(now)
            while q[0] <= now - m.catchup_s:
                q.popleft()
            self._peak_updates = max(self._peak_updates, len(q))
            self._push(now + r.spec.soak_s / 2, _HEALTH, idx, attempt)
        elif kind == _HEALTH:
            bad = self.behaviour[idx] == _SICK
            self.core.handle(dev, JobUpdate(dev, r.id, attempt, 1.0,
                                            Health(ok=not bad, error_rate=0.5 if bad else 0.0,
                                                   backlog_bytes=0)), now)


    def run(self, spec: RolloutSpec, *, max_s: float = 7 * 86400.0) -> SimResult:
        """Run one rollout to its end (or ``max_s`` of simulated time)."""
        wall = time.perf_counter()
        start = self.now
        self._rollout = r = self.core.create(spec, self.now)
        heap = self.heap
        while not r.done and self.now - start < max_s:
            t_dev = heap[0][0] if heap else math.inf
            t_eng = r.next_deadline()
            if t_dev == math.inf and t_eng == math.inf:
                break  # paused (gate failed) or stuck: nothing more will happen
            if t_dev <= t_eng:
                t, _, kind, idx, attempt = heapq.heappop(heap)
                self.now = max(self.now, t)
                self._device_event(kind, idx, attempt)
            else:
                self.now = max(self.now, t_eng)
                r.tick(self.now)
        m = self.model
        ingest_peak = self._peak_updates * m.backlog_bytes / m.catchup_s
        prog = r.progress(self.now)
        end = r.finished_at or self.now
        starts = [round((w.started_at - start) / 60.0, 2) for w in r.waves]
        limits = _limits(spec, m, r.n, starts, prog["states"])  # type: ignore[arg-type]
        return SimResult(
            status=r.status, reason=r.reason,
            simulated_minutes_to_complete=round((end - start) / 60.0, 2),
            simulated_minutes_to_last_update=round(
                (max(self.effects.last_done, start) - start) / 60.0, 2),
            devices=r.n, states=prog["states"],  # type: ignore[arg-type]
            waves=len(r.waves), wave_sizes=[w.end - w.start for w in r.waves],
            gate_verdicts=[w.gate for w in r.waves], rollback_waves=len(r.rb_waves),
            peak_notifications_per_minute=self.peak_notify,
            peak_ingest_bytes_per_s=round(ingest_peak, 1),
            transitions=self.effects.transitions, notifications=r.notifications,
            wall_seconds=round(time.perf_counter() - wall, 3),
            wave_start_minutes=starts, limits_minutes=limits,
            bound_by=max(limits, key=lambda k: limits[k]) if limits else "")


def _limits(spec: RolloutSpec, m: FleetModel, n: int, starts: list[float],
            states: dict[str, int]) -> dict[str, float]:
    """Lower bounds (minutes) the duration cannot beat, one per limit:

    * ``notification_rate``: every device notified at ``max_notifications_per_min``;
    * ``max_in_flight``: devices busy for a mean update each, ``max_in_flight`` at a time;
    * ``wave_gates``: the last wave can only start once the earlier ones passed their
      gates (update + soak of enough devices per wave);
    * ``offline_wait``: offline devices of the last wave are waited for
      ``offline_wait_s`` before being skipped;
    * ``device_timeouts``: a hung device of the last wave is given up on after
      ``device_timeout_s`` per attempt.
    """
    last = starts[-1] if starts else 0.0
    mean_update = (m.update_min_s + m.update_max_s) / 2.0
    out = {"notification_rate": n / spec.max_notifications_per_min,
           "max_in_flight": n * mean_update / spec.max_in_flight / 60.0,
           "wave_gates": last}
    if states.get("skipped"):
        out["offline_wait"] = last + spec.offline_wait_s / 60.0
    if states.get("timed_out"):
        attempts = 1 + (spec.max_retries if spec.retry_timeouts else 0)
        out["device_timeouts"] = last + spec.device_timeout_s * attempts / 60.0
    return {k: round(v, 2) for k, v in out.items()}


def dry_run(spec: RolloutSpec, model: FleetModel) -> SimResult:
    """Simulate ``spec`` against ``model`` and return the prediction."""
    return Simulation(model).run(spec)


def terminal_fraction(r: Rollout) -> float:
    """Fraction of target devices in a terminal state."""
    return sum(r.counts[s] for s in TERMINAL) / r.n if r.n else 1.0


def summary(res: SimResult) -> dict[str, Any]:
    """Result as plain data."""
    out: dict[str, Any] = msgspec.to_builtins(res)
    out["succeeded"] = res.states.get(DeviceState.SUCCEEDED.name.lower(), 0)
    return out
