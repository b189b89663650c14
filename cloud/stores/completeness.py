"""The cloud side of the completeness ledger: every sequence number stored or accounted for.

A *stream* is what one agent numbers: ``(device_id, instance)``. The instance id is
generated once per agent buffer and rides in every envelope (v4), so two gateways
configured with one device id are two streams, each stored once, never one stream whose
second half is acked as "duplicate" and dropped.

Per batch, inside the store's write transaction, :func:`plan_batch` classifies each chunk
against the stream's idempotency state and the chunk digests already kept:

- all its sequence numbers new: written, and its digest (first/last seq, count, CRC32 of
  the payload) kept;
- a resend (same first seq, same digest): a duplicate, written zero times;
- the same sequence numbers with other content: a **conflict**, never a duplicate: the
  stored copy stays, the new copy is kept apart (``conflicts`` table, with its payload),
  counted and reported, and the device is told (ack ``conflict``);
- sequence numbers the device had given up (an exact gap record) that arrive after all
  (a chunk in flight when it was evicted): written.

Gap records (:class:`~pymigrate.types.Gap`) are kept in ``gaps``; exact ones also settle
their sequence numbers in the idempotency state, which keeps that state small after
evictions (the watermark moves past them). Readings the ingest acks without storing (a
redundant gateway's copy) get a cloud-side gap record of their own.

:func:`account` turns what a store holds for one stream into the report
``pymigrate cloud completeness`` prints: ``max_seq``, ``stored``, ``gaps`` by reason,
``unexplained`` (neither stored nor named by a gap), ``duplicates``, ``conflicts``.
"""

from __future__ import annotations

import bisect
from collections.abc import Awaitable, Callable, Iterable, Sequence

import msgspec

from cloud.dedup import IdempotencyState
from cloud.stores.base import Admit, plan_write
from pymigrate.types import Gap, Reading

__all__ = ["BatchMeta", "BatchPlan", "ChunkDigest", "StreamReport", "account", "plan_batch",
           "runs_size", "runs_subtract", "runs_union"]

Runs = list[tuple[int, int]]


class ChunkDigest(msgspec.Struct, frozen=True):
    """What identifies a chunk's content: its range, count and payload CRC32; ``start``
    and ``n`` locate its decoded readings in the batch's reading list."""

    seq_first: int
    seq_last: int
    count: int
    checksum: int
    start: int = 0
    n: int = 0

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.seq_last, self.count, self.checksum)


class BatchMeta(msgspec.Struct, frozen=True):
    """The envelope's stream identity, chunk digests and gap records, for the store."""

    instance: str = ""
    seq_base: int = 1
    hwm: int = 0
    chunks: list[ChunkDigest] = msgspec.field(default_factory=list)
    gaps: list[Gap] = msgspec.field(default_factory=list)
    payload: bytes = b""
    peer: str = ""


class BatchPlan(msgspec.Struct):
    """What one batch does to a stream (see :func:`plan_batch`)."""

    write: list[Reading]
    delete: list[tuple[str, str, int]]
    skipped: list[Reading]
    duplicates: int
    conflicts: list[tuple[ChunkDigest, int]]  # (chunk, readings) kept apart
    digests: list[ChunkDigest]  # new chunks whose digest is kept
    gaps: list[Gap]  # device gap records + cloud-side ones (gateway copies)
    state: IdempotencyState | None
    late: int = 0  # readings written after their gap record

    @property
    def conflicted(self) -> int:
        return sum(n for _, n in self.conflicts)


DigestLookup = Callable[[Sequence[int]], Awaitable[dict[int, tuple[int, int, int]]]]
GapLookup = Callable[[int, int], Awaitable[Runs]]


async def plan_batch(state: IdempotencyState, readings: Sequence[Reading], meta: BatchMeta,
                     admit: Admit | None, *, digests: DigestLookup,
                     gap_runs: GapLookup, now_ms: int = 0) -> BatchPlan:
    """Classify a batch's chunks against ``state`` (updated in place) and the digests
    kept; run inside the store's write transaction after the state row was locked."""
    if not meta.chunks:  # an envelope without chunk digests (v1-v3): sequence numbers only
        p = plan_write(state, readings, admit)
        st = p.state
        if meta.gaps:
            st = st or state
            _settle(st, meta.gaps)
        return BatchPlan(p.write, p.delete, p.skip, p.duplicates, [], [],
                         [*meta.gaps, *_cloud_gaps(p.skip, p.delete, now_ms)], st)
    fresh: list[Reading] = []
    new: list[ChunkDigest] = []
    maybe: list[tuple[ChunkDigest, list[Reading], bool]] = []
    for c in meta.chunks:
        rs = list(readings[c.start:c.start + c.n])
        if not rs:
            continue
        seqs = [r.seq for r in rs]
        lo, hi = min(seqs), max(seqs)
        if state.missing(lo, hi) == [(lo, hi)]:
            fresh.extend(rs)
            new.append(c)
            continue
        have = [state.contains(s) for s in seqs]
        if not any(have):
            fresh.extend(rs)
            new.append(c)
        else:
            maybe.append((c, rs, all(have)))
    dups = 0
    late = 0
    conflicts: list[tuple[ChunkDigest, int]] = []
    if maybe:
        kept = await digests([c.seq_first for c, _, _ in maybe])
        for c, rs, every in maybe:
            if kept.get(c.seq_first) == c.key:
                dups += len(rs)
                continue
            if every and kept.get(c.seq_first) is None:
                settled = await gap_runs(min(r.seq for r in rs), max(r.seq for r in rs))
                if settled and all(_in_runs(settled, r.seq) for r in rs):
                    fresh.extend(rs)  # given up by the device, then delivered after all
                    new.append(c)
                    late += len(rs)
                    continue
            conflicts.append((c, len(rs)))
    write, skip, delete = fresh, [], []
    if fresh and admit is not None:
        adm = admit(fresh)
        write, skip, delete = adm.write, adm.skip, adm.delete
    changed = bool(fresh) or bool(meta.gaps)
    for a, b in _runs_of(r.seq for r in fresh):
        state.add_range(a, b)
    _settle(state, meta.gaps)
    gaps = [*meta.gaps, *_cloud_gaps(skip, delete, now_ms)]
    return BatchPlan(write, delete, skip, dups, conflicts, new, gaps,
                     state if changed else None, late)


def _settle(state: IdempotencyState, gaps: Iterable[Gap]) -> None:
    """Exact gap records settle their sequence numbers (the watermark may pass them)."""
    for g in gaps:
        for a, b in g.runs:
            state.add_range(a, b)


def _cloud_gaps(skipped: Sequence[Reading], deleted: Sequence[tuple[str, str, int]],
                now_ms: int) -> list[Gap]:
    """Readings acked but not stored (another gateway's copy of the event is): gap
    records made by the cloud, so the ledger explains them too."""
    out: list[Gap] = []
    runs = _runs_of(r.seq for r in skipped)
    if runs:
        out.append(Gap(runs[0][0], runs[-1][1], runs_size(runs), "gateway_duplicate", now_ms,
                       runs, "another gateway's copy of the same event is stored"))
    return out


def _runs_of(seqs: Iterable[int]) -> Runs:
    runs: Runs = []
    for s in sorted(set(seqs)):
        if runs and s == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], s)
        else:
            runs.append((s, s))
    return runs


def _in_runs(runs: Runs, s: int) -> bool:
    i = bisect.bisect_right(runs, (s, 2**63)) - 1
    return i >= 0 and runs[i][0] <= s <= runs[i][1]


# -- interval arithmetic on sorted, disjoint inclusive runs --------------------------------
def runs_size(runs: Iterable[tuple[int, int]]) -> int:
    return sum(b - a + 1 for a, b in runs)


def runs_union(*sets: Iterable[tuple[int, int]]) -> Runs:
    items = sorted(r for s in sets for r in s)
    out: Runs = []
    for a, b in items:
        if out and a <= out[-1][1] + 1:
            if b > out[-1][1]:
                out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def runs_subtract(runs: Iterable[tuple[int, int]], minus: Runs) -> Runs:
    """``runs`` without ``minus`` (both sorted and disjoint)."""
    out: Runs = []
    j = 0
    for a, b in runs:
        cur = a
        while j < len(minus) and minus[j][1] < cur:
            j += 1
        k = j
        while cur <= b and k < len(minus) and minus[k][0] <= b:
            ma, mb = minus[k]
            if ma > cur:
                out.append((cur, ma - 1))
            cur = max(cur, mb + 1)
            k += 1
        if cur <= b:
            out.append((cur, b))
    return out


class StreamReport(msgspec.Struct):
    """Completeness of one stream (one agent's numbering of one device)."""

    device_id: str
    instance: str
    seq_base: int
    max_seq: int
    stored: int
    gaps: dict[str, int]
    unexplained: int
    duplicates: int = 0
    conflicts: int = 0
    unexplained_runs: list[tuple[int, int]] = msgspec.field(default_factory=list)
    last_seen_ms: int = 0
    ranges_forgotten: int = 0  # idempotency ranges dropped for size (resends hit the key)
    state_ranges: int = 0  # exception ranges the idempotency state holds now

    @property
    def complete(self) -> bool:
        return self.unexplained == 0


def account(device_id: str, instance: str, *, seq_base: int, hwm: int, stored: Runs,
            gaps: Iterable[Gap], duplicates: int = 0, conflicts: int = 0,
            last_seen_ms: int = 0, max_runs: int = 20, ranges_forgotten: int = 0,
            state_ranges: int = 0) -> StreamReport:
    """Account every sequence number of ``[seq_base, max_seq]``: stored, in a gap (by
    reason), or unexplained. ``stored`` are the stored sequence numbers as runs.

    A sequence number both stored and in a gap counts as stored. Exact gaps are counted
    before range-only ones (what an unreadable database left), which explain only what
    nothing else does.
    """
    gap_list = list(gaps)
    top = max([hwm, stored[-1][1] if stored else 0, *(g.seq_last for g in gap_list)])
    universe: Runs = [(seq_base, top)] if top >= seq_base else []
    accounted = runs_union(stored)
    by_reason: dict[str, int] = {}
    for g in sorted(gap_list, key=lambda g: not g.exact):
        part = g.runs if g.exact else [(g.seq_first, g.seq_last)]
        new = runs_subtract(runs_union(part), accounted)
        n = runs_size(new)
        if n:
            by_reason[g.reason] = by_reason.get(g.reason, 0) + n
            accounted = runs_union(accounted, new)
        else:
            by_reason.setdefault(g.reason, 0)
    missing = runs_subtract(universe, accounted)
    return StreamReport(device_id, instance, seq_base, top, runs_size(stored), by_reason,
                        runs_size(missing), duplicates, conflicts, missing[:max_runs],
                        last_seen_ms, ranges_forgotten, state_ranges)
