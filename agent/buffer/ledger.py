"""In-memory accounting of what the database holds, and the effects of one transaction.

Write transactions collect their effects in an :class:`Effects`; the buffer applies them to
its :class:`Ledger` only after ``COMMIT`` succeeds, so a rolled-back transaction leaves the
counters untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pymigrate.types import Priority

Key = tuple[str, int]  # (device_id, priority)


@dataclass(slots=True)
class Removed:
    """A chunk row that left the table; ``reason`` None means delivered (acked)."""

    id: int
    priority: int
    nbytes: int
    count: int
    reason: str | None


@dataclass
class Effects:
    """What one transaction changed, applied to the ledger after commit."""

    inserted: list[tuple[int, int, int]] = field(default_factory=list)  # prio, nbytes, count
    removed: list[Removed] = field(default_factory=list)
    resized: list[tuple[int, int, int]] = field(default_factory=list)  # prio, dbytes, dcount
    staging: dict[Key, int] = field(default_factory=dict)  # key -> new staged bytes
    degraded: int = 0
    quarantined: int = 0
    gaps: int = 0  # gap records written
    gap_readings: int = 0  # sequence numbers they account for
    gaps_acked: int = 0  # gap records the cloud acknowledged (deleted)
    gaps_merged: int = 0  # gap records folded into a pending record (no new row)
    # ids of gap records written by this process and never handed out: the only ones a
    # new record may be folded into (the cloud keeps the first version of a record it saw)
    gap_open: frozenset[int] = frozenset()
    gap_new: list[int] = field(default_factory=list)  # ids of the rows this txn wrote


@dataclass
class Ledger:
    """Counters mirroring the database (sealed chunks, staging) plus in-flight ids."""

    chunks: list[int] = field(default_factory=lambda: [0] * len(Priority))
    readings: list[int] = field(default_factory=lambda: [0] * len(Priority))
    payload: int = 0
    staging: dict[Key, int] = field(default_factory=dict)
    # per priority: (id, ts_first, born_ms) of the oldest chunk, or None (born_ms: the
    # buffer's own age clock at seal, see DurableBuffer.age_ms)
    head: list[tuple[int, int, int] | None] = field(default_factory=lambda: [None] * 4)
    inflight: dict[int, int] = field(default_factory=dict)  # id -> priority
    gaps: int = 0  # gap records pending (not yet acked by the cloud)
    gaps_inflight: set[int] = field(default_factory=set)
    gaps_open: set[int] = field(default_factory=set)  # see Effects.gap_open

    @property
    def staged_bytes(self) -> int:
        return sum(self.staging.values())

    @property
    def total_bytes(self) -> int:
        return self.payload + self.staged_bytes

    def available(self, min_priority: int) -> bool:
        """Is there a stored chunk of priority <= ``min_priority`` not in flight?"""
        if self.gaps > len(self.gaps_inflight):
            return True
        busy = [0] * len(Priority)
        for p in self.inflight.values():
            busy[p] += 1
        return any(self.chunks[p] > busy[p] for p in range(min_priority + 1))

    def apply(self, fx: Effects) -> None:
        self.gaps += fx.gaps - fx.gaps_acked
        self.gaps_open.update(fx.gap_new)
        for p, nbytes, count in fx.inserted:
            self.chunks[p] += 1
            self.readings[p] += count
            self.payload += nbytes
        for r in fx.removed:
            self.chunks[r.priority] -= 1
            self.readings[r.priority] -= r.count
            self.payload -= r.nbytes
            self.inflight.pop(r.id, None)
        for p, dbytes, dcount in fx.resized:
            self.readings[p] += dcount
            self.payload += dbytes
        for key, nbytes in fx.staging.items():
            if nbytes:
                self.staging[key] = nbytes
            else:
                self.staging.pop(key, None)
