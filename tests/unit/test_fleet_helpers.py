"""Shared helpers for fleet unit tests (no tests here): a scripted fleet on virtual time."""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable

from cloud.fleet.core import FleetCore
from cloud.fleet.engine import Rollout
from cloud.fleet.protocol import Health, JobResult, JobStart, JobUpdate
from cloud.fleet.registry import Registry
from cloud.fleet.spec import RolloutSpec

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z (a Thursday)


class Scripted:
    """Effects + devices: each device answers per its behaviour after ``dur`` seconds.

    Behaviours: ok, fail, retry (retriable failure), hang, reject, sick (unhealthy
    during soak), unhealthy (reports success with bad health), rbfail (rollback fails),
    mute (never answers anything).
    """

    def __init__(self, n: int, *, behaviour: Callable[[int], str] = lambda i: "ok",
                 dur: float = 60.0, offline: set[int] | None = None) -> None:
        self.reg = Registry()
        for i in range(n):
            self.reg.add(f"d{i}", {"region": "eu" if i % 2 else "us", "hardware": "gw1"},
                         online=i not in (offline or set()))
        self.core = FleetCore(self.reg, self)
        self.behaviour = behaviour
        self.dur = dur
        self.now = T0
        self.heap: list[tuple[float, int, str, int, int]] = []
        self.seq = 0
        self.sent: list[tuple[float, int, str, int]] = []
        self.transitions: list[tuple[int, int, int, str]] = []
        self.changes = 0
        self.r: Rollout | None = None

    # Effects
    def notify(self, rollout: Rollout, idx: int, op: str, attempt: int) -> None:
        self.sent.append((self.now, idx, op, attempt))
        b = self.behaviour(idx)
        if b == "mute" or not self.reg.online[idx]:
            return
        if op == "rollback":
            self.push(self.now + 5, "rb_fail" if b == "rbfail" else "rb", idx, attempt)
            return
        self.push(self.now + 1, "start", idx, attempt)
        if b != "hang":
            self.push(self.now + self.dur, b, idx, attempt)

    def transition(self, rollout: Rollout, idx: int, src: int, dst: int, attempt: int,
                   reason: str, now: float) -> None:
        self.transitions.append((idx, src, dst, reason))

    def changed(self, rollout: Rollout) -> None:
        self.changes += 1

    def push(self, t: float, kind: str, idx: int, attempt: int = 0) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, idx, attempt))

    def start(self, spec: RolloutSpec) -> Rollout:
        self.r = self.core.create(spec, self.now)
        return self.r

    def device(self, kind: str, idx: int, attempt: int) -> None:
        dev = self.reg.ids[idx]
        assert self.r is not None
        rid = self.r.id
        h = self.core.handle
        if kind == "start":
            h(dev, JobStart(dev, rid, attempt), self.now)
        elif kind in ("ok", "sick"):
            h(dev, JobResult(dev, rid, "succeeded", attempt, health=Health()), self.now)
            if kind == "sick":
                self.push(self.now + 10, "bad_health", idx, attempt)
        elif kind == "unhealthy":
            h(dev, JobResult(dev, rid, "succeeded", attempt, health=Health(ok=False)), self.now)
        elif kind == "bad_health":
            h(dev, JobUpdate(dev, rid, attempt, 1.0, Health(error_rate=0.9)), self.now)
        elif kind in ("fail", "retry"):
            h(dev, JobResult(dev, rid, "failed", attempt, retriable=kind == "retry"), self.now)
        elif kind == "reject":
            h(dev, JobResult(dev, rid, "rejected", attempt, reason="incompatible"), self.now)
        elif kind == "rb":
            h(dev, JobResult(dev, rid, "rolled_back", attempt), self.now)
        elif kind == "rb_fail":
            h(dev, JobResult(dev, rid, "rollback_failed", attempt), self.now)
        elif kind == "online":
            h(dev, JobStart(dev), self.now)

    def run(self, until: float = math.inf, *, max_events: int = 1_000_000) -> None:
        """Advance virtual time event by event until the rollout is done or ``until``."""
        assert self.r is not None
        for _ in range(max_events):
            if self.r.done:
                return
            t_dev = self.heap[0][0] if self.heap else math.inf
            t_eng = self.core.next_deadline()
            t = min(t_dev, t_eng)
            if t > until or math.isinf(t):
                self.now = max(self.now, until) if not math.isinf(until) else self.now
                return
            self.now = max(self.now, t)
            if t_dev <= t_eng:
                _, _, kind, idx, attempt = heapq.heappop(self.heap)
                self.device(kind, idx, attempt)
            else:
                self.core.tick(self.now)
        raise AssertionError("too many events")
