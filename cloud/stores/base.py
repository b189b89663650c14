"""The store interface every cloud store implements (SQLite, PostgreSQL, InfluxDB, ...).

Shared pieces live here too: the typed errors a store raises (:class:`StoreRejected` for
bad data: dead-letter, do not retry; :class:`StoreUnavailable` for an outage: the device
keeps the data and retries), the pre-write validation every store applies, and
:func:`plan_write`, the idempotency step each store runs *inside* its write transaction
against the device's persisted :class:`~cloud.dedup.IdempotencyState`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import msgspec

from cloud.dedup import IdempotencyState
from pymigrate.errors import PayloadRejected, PyMigrateError
from pymigrate.types import Reading

_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1
MAX_NAME = 256


class WriteResult(msgspec.Struct, frozen=True):
    """Outcome of one idempotent batch write."""

    written: int  # new readings stored
    duplicates: int  # readings already stored (by device + seq), not written again
    gateway_dropped: int = 0  # copies of another gateway's reading, acked but not stored
    replaced: int = 0  # stored copies replaced by a better/averaged one (gateway policy)
    conflicts: int = 0  # readings whose seqs were stored with other content: kept apart
    gaps: int = 0  # gap records kept (device's and the cloud's own)
    late: int = 0  # readings written after the device had recorded them as a gap
    rejected: int = 0  # refused one by one by the database, each dead-lettered (Timestream)


class AggregateRow(msgspec.Struct, frozen=True):
    """One bucket of one sensor: what ``pymigrate cloud query --agg`` prints."""

    sensor: str
    bucket_ms: int  # bucket start, epoch ms (buckets aligned to the epoch)
    min: float
    max: float
    avg: float
    sum: float
    count: int


class SeqRange(msgspec.Struct, frozen=True):
    seq_first: int
    seq_last: int


class StoreRejected(PayloadRejected):
    """The store refuses the batch's data: non-retriable, dead-lettered with ``reason``."""

    reason = "store_rejected"


class StoreUnavailable(PyMigrateError):
    """The store cannot be reached or failed transiently: retriable (back-pressure)."""

    retriable = True
    reason = "store_unavailable"


class Admission(msgspec.Struct):
    """What a gateway filter decided for the not-yet-stored readings of a batch.

    ``write``: store these; ``skip``: acknowledge (mark their seqs stored) but do not
    write; ``delete``: (device_id, instance, seq) of previously stored copies to remove in the same
    transaction (a replacing policy wrote a better copy).
    """

    write: list[Reading]
    skip: list[Reading]
    delete: list[tuple[str, str, int]]


Admit = Callable[[list[Reading]], Admission]


class WritePlan(msgspec.Struct):
    """Result of :func:`plan_write`: what to write and what the state becomes."""

    write: list[Reading]
    delete: list[tuple[str, str, int]]
    duplicates: int
    skipped: int
    state: IdempotencyState | None  # None: nothing new, leave the stored state as it is
    skip: list[Reading] = msgspec.field(default_factory=list)


def validate(device_id: str, readings: Sequence[Reading]) -> None:
    """Checks every store shares; raises :class:`StoreRejected` naming the reason."""
    if (not device_id or len(device_id) > MAX_NAME
            or any(ord(ch) < 32 or ord(ch) == 127 for ch in device_id)):
        raise StoreRejected(f"bad device id {device_id[:40]!r}", reason="bad_device_id")
    for r in readings:
        if r.device_id != device_id:
            raise StoreRejected("reading of another device in the batch",
                                reason="device_mismatch")
        if r.seq < 1 or r.seq > _I64_MAX:
            raise StoreRejected(f"sequence number {r.seq} out of range (>= 1)",
                                reason="bad_seq")
        if not _I64_MIN <= r.ts_ms <= _I64_MAX:
            raise StoreRejected("timestamp outside int64", reason="bad_timestamp")
        s = r.sensor
        if not s or len(s) > MAX_NAME or "\x00" in s:
            raise StoreRejected(f"bad sensor name {s[:40]!r}", reason="bad_sensor")


def require_finite(readings: Sequence[Reading]) -> None:
    """For stores that cannot hold NaN/inf (InfluxDB line protocol, Timestream)."""
    for r in readings:
        if not math.isfinite(r.value):
            raise StoreRejected(f"non-finite value for {r.sensor} seq {r.seq}",
                                reason="non_finite_value")


def seq_runs(seqs: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted contiguous runs of a collection of sequence numbers."""
    if not seqs:
        return []
    ordered = sorted(seqs)
    runs: list[tuple[int, int]] = []
    a = b = ordered[0]
    for s in ordered[1:]:
        if s <= b + 1:
            b = max(b, s)
        else:
            runs.append((a, b))
            a = b = s
    runs.append((a, b))
    return runs


def plan_write(state: IdempotencyState, readings: Sequence[Reading],
               admit: Admit | None = None) -> WritePlan:
    """Split ``readings`` into new and already stored against ``state`` (which is
    updated in place with every new seq, written or skipped).

    Runs inside the store's transaction, after the state row was read (locked).
    A seq repeated within the batch counts as a duplicate after its first occurrence.
    """
    if not readings:
        return WritePlan([], [], 0, 0, None)
    seqs = [r.seq for r in readings]
    lo, hi = min(seqs), max(seqs)
    missing = state.missing(lo, hi)
    if (missing == [(lo, hi)] and hi - lo + 1 == len(seqs)
            and len(set(seqs)) == len(seqs)):
        # fast path: all new and (count == span) each seq exactly once
        fresh: list[Reading] = list(readings)
        new_runs = [(lo, hi)]
    else:
        seen: set[int] = set()
        fresh = []
        for r in readings:
            if r.seq in seen or state.contains(r.seq):
                continue
            seen.add(r.seq)
            fresh.append(r)
        new_runs = seq_runs(list(seen))
    dups = len(readings) - len(fresh)
    if not fresh:
        return WritePlan([], [], dups, 0, None)
    write, skip, delete = fresh, [], []
    if admit is not None:
        adm = admit(fresh)
        write, skip, delete = adm.write, adm.skip, adm.delete
    for a, b in new_runs:
        state.add_range(a, b)
    return WritePlan(write, delete, dups, len(skip), state, list(skip))


@runtime_checkable
class Store(Protocol):
    """Idempotent time-series store.

    ``write`` stores readings of one device in one transaction; a reading whose
    (device_id, seq) is already stored is counted as a duplicate and not written again.
    The device's idempotency state is read, updated and saved in that same transaction,
    so it survives restarts and is shared by every replica using the store.
    It returns only after the transaction committed: the ingest acks after that.
    Bad data raises :class:`StoreRejected`; an outage raises :class:`StoreUnavailable`
    (or any other exception, treated as an outage).
    """

    name: str

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def write(self, device_id: str, batch_id: str, readings: Sequence[Reading],
                    *, admit: Admit | None = None, meta: Any = None) -> WriteResult:
        """``meta`` (:class:`~cloud.stores.completeness.BatchMeta`): the stream identity,
        chunk digests and gap records of the envelope, kept in the same transaction."""
        ...

    async def dead_letter(self, device_id: str, batch_id: str, reason: str, payload: bytes,
                          *, peer: str = "") -> None:
        ...

    async def query(self, device_id: str, sensor: str | None = None,
                    start_ms: int | None = None, end_ms: int | None = None) -> list[Reading]:
        ...

    async def count(self, device_id: str | None = None) -> int: ...

    async def dead_letters(self, limit: int = 100) -> list[tuple[str, str, str]]:
        """Most recent dead letters as (device_id, batch_id, reason), newest first."""
        ...

    async def idempotency_state(self, device_id: str) -> IdempotencyState:
        """The persisted state of a device (empty when it never wrote)."""
        ...
