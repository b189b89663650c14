"""Progress report of a rollout: per-wave and per-state counts, rates, ETA."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from cloud.fleet.states import TERMINAL, DeviceState

if TYPE_CHECKING:
    from cloud.fleet.engine import Rollout

S = DeviceState
_NAMES = [s.name.lower() for s in DeviceState]


def rollout_progress(r: Rollout, now: float) -> dict[str, object]:
    """Progress of ``r`` at ``now``: counts are O(states + waves); the mean device
    progress scans the targets once (status requests only, never per event)."""
    c = r.counts
    succ = c[S.SUCCEEDED]
    fail = c[S.FAILED] + c[S.TIMED_OUT] + c[S.REJECTED]
    terminal = sum(c[s] for s in TERMINAL)
    elapsed = max(1e-9, (r.finished_at or now) - r.created_at)
    eta = 0.0 if r.done else (
        (r.n - terminal) * elapsed / terminal if terminal else math.inf)
    return {
        "rollout_id": r.id, "status": r.status, "reason": r.reason,
        "devices": r.n, "assigned": r.cursor,
        "states": {_NAMES[i]: n for i, n in enumerate(c) if n},
        "success_rate": round(succ / (succ + fail), 4) if succ + fail else None,
        "failure_rate": round(fail / (succ + fail), 4) if succ + fail else None,
        "in_flight": r.in_flight, "elapsed_s": round(elapsed, 1),
        "eta_s": None if math.isinf(eta) else round(eta, 1),
        "notifications": r.notifications,
        "progress": r.mean_progress(),
        "waves": [{"wave": w.index, "size": w.end - w.start, "planned": w.planned,
                   "gate": w.gate, "offline_waiting": len(r.offline[w.index]),
                   "progress": r.mean_progress(w.start, w.end),
                   "states": {_NAMES[i]: n for i, n in enumerate(r.wcounts[w.index]) if n}}
                  for w in r.waves],
        "rollback_waves": len(r.rb_waves),
    }
