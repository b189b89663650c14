"""The chaos run's ground truth and its exactly-once audit.

Every reading the harness publishes to a device's local MQTT source is logged by natural
key ``(device, sensor, value)`` (values are unique per device, so the key survives clock
jumps and time correction). The audit compares that log with the cloud store and sorts
every difference into: duplicated, quarantined (a chunk the harness corrupted, decoded
before corruption so its keys are known), evicted by policy (per device and priority, up
to the readings the agent's ``buffer.evicted`` log events account for) and lost (the rest).
"""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Key = tuple[str, str, float]

PRIORITY_NAMES = ("critical", "high", "normal", "low")


def key(device: str, sensor: str, value: float) -> Key:
    return (device, sensor, round(float(value), 6))


@dataclass
class Truth:
    """What the sources were given: natural key -> (priority name, publish time ms)."""

    produced: dict[Key, tuple[str, int]] = field(default_factory=dict)
    quarantined: set[Key] = field(default_factory=set)  # keys inside corrupted chunks

    def add(self, device: str, sensor: str, value: float, priority: str, t_ms: int) -> None:
        self.produced[key(device, sensor, value)] = (priority, t_ms)


def agent_log_events(path: Path) -> dict[str, Any]:
    """Evictions (readings per priority) and quarantines from an agent's JSON log."""
    evicted: collections.Counter[str] = collections.Counter()
    quarantined = 0
    rejected = 0
    if not path.exists():
        return {"evicted": evicted, "quarantined": 0, "rejected": 0}
    for line in path.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        name = ev.get("event")
        if name == "buffer.evicted":
            evicted[str(ev.get("priority"))] += int(ev.get("readings", 0))
        elif name == "buffer.quarantined":
            quarantined += 1
        elif isinstance(name, str) and "reject" in name:
            rejected += 1
    return {"evicted": evicted, "quarantined": quarantined, "rejected": rejected}


def audit(truth: Truth, stored: list[tuple[str, str, float, int]],
          evicted_by_device: dict[str, collections.Counter[str]]) -> dict[str, Any]:
    """Compare ``truth`` with ``stored`` rows ``(device, sensor, value, ts_ms)``."""
    counts: collections.Counter[Key] = collections.Counter()
    ts_err: list[int] = []
    for dev, sensor, value, ts in stored:
        k = key(dev, sensor, value)
        counts[k] += 1
        if k in truth.produced and counts[k] == 1:
            ts_err.append(abs(int(ts) - truth.produced[k][1]))
    duplicated = sum(n - 1 for n in counts.values() if n > 1)
    unknown = sum(1 for k in counts if k not in truth.produced)
    missing = [k for k in truth.produced if k not in counts]
    quarantined = [k for k in missing if k in truth.quarantined]
    rest = [k for k in missing if k not in truth.quarantined]
    by_dev_prio: collections.Counter[tuple[str, str]] = collections.Counter(
        (k[0], truth.produced[k][0]) for k in rest)
    evicted: collections.Counter[str] = collections.Counter()
    lost: collections.Counter[str] = collections.Counter()
    for (dev, prio), n in by_dev_prio.items():
        budget = evicted_by_device.get(dev, collections.Counter())[prio]
        ok = min(n, budget)
        evicted[prio] += ok
        lost[prio] += n - ok
    ts_err.sort()

    def pct(p: float) -> int | None:
        return ts_err[min(len(ts_err) - 1, int(p * len(ts_err)))] if ts_err else None

    return {
        "produced": len(truth.produced),
        "stored_rows": len(stored),
        "stored_distinct": len(counts),
        "lost": sum(lost.values()),
        "lost_by_priority": {p: lost[p] for p in PRIORITY_NAMES if lost[p]},
        "duplicated": duplicated,
        "unknown_in_store": unknown,
        "evicted_by_policy": {p: evicted[p] for p in PRIORITY_NAMES if evicted[p]},
        "quarantined_readings": len(quarantined),
        "ts_abs_error_ms": {"p50": pct(0.5), "p99": pct(0.99),
                            "max": ts_err[-1] if ts_err else None,
                            "over_5s": sum(1 for e in ts_err if e > 5000)},
    }
