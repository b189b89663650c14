"""The cloud's idempotency state stays small across a day of a gateway whose buffer
evicts: exact gap records settle the evicted sequence numbers, so the watermark moves past
them instead of one exception range per hole (which would overflow and be forgotten)."""

from __future__ import annotations

from cloud.dedup import IdempotencyState
from cloud.stores.completeness import BatchMeta, ChunkDigest, account, plan_batch
from pymigrate.types import Gap, Priority, Reading, seq_runs_of

T0 = 1_767_225_600_000
SENSORS = 10  # at 1 Hz: 8 normal, 2 low


def _day() -> tuple[list[Reading], list[Reading]]:
    normal: list[Reading] = []
    low: list[Reading] = []
    seq = 0
    for t in range(86_400):
        for s in range(SENSORS):
            seq += 1
            r = Reading("gw", f"s{s}", T0 + t * 1000, float(t % 100), seq=seq,
                        priority=Priority.LOW if s >= 8 else Priority.NORMAL)
            (low if s >= 8 else normal).append(r)
    return normal, low


async def _no_digests(firsts: object) -> dict[int, tuple[int, int, int]]:
    raise AssertionError("no chunk is resent in this day")


async def _no_gaps(lo: int, hi: int) -> list[tuple[int, int]]:
    raise AssertionError("no chunk arrives after its gap in this day")


async def test_a_day_with_evictions_keeps_the_state_small() -> None:
    """The store's idempotency step (:func:`plan_batch`, run in every store's write
    transaction) over a day, chunks delivered as the agent seals them (600 readings per
    priority; every other LOW chunk evicted on the device), then :func:`account`."""
    normal, low = _day()
    everything = sorted(normal + low, key=lambda r: r.seq)
    state = IdempotencyState()
    unsettled = IdempotencyState()  # the same day without gap records, for comparison
    gaps: list[Gap] = []
    stored: list[int] = []
    open_: dict[Priority, list[Reading]] = {Priority.NORMAL: [], Priority.LOW: []}
    sealed_low = 0
    widest = 0
    for r in everything:
        chunk = open_[r.priority]
        chunk.append(r)
        if len(chunk) < 600:
            continue
        open_[r.priority] = []
        batch: list[Reading] = []
        bgaps: list[Gap] = []
        if r.priority is Priority.LOW:
            sealed_low += 1
            if sealed_low % 2:
                bgaps.append(Gap(chunk[0].seq, chunk[-1].seq, len(chunk), "evicted", 0,
                                 [(x.seq, x.seq) for x in chunk]))
        if not bgaps:
            batch = chunk
        digests = [ChunkDigest(batch[0].seq, batch[-1].seq, len(batch), 0, 0, len(batch))
                   ] if batch else []
        meta = BatchMeta("i" * 16, 1, r.seq, digests, bgaps)
        plan = await plan_batch(state, batch, meta, None, digests=_no_digests,
                                gap_runs=_no_gaps)
        assert plan.duplicates == 0 and not plan.conflicts
        stored.extend(x.seq for x in plan.write)
        gaps.extend(plan.gaps)
        widest = max(widest, len(state.ranges()))
        for a, b in seq_runs_of([x.seq for x in batch]):
            unsettled.add_range(a, b)
    rep = account("gw", "i" * 16, seq_base=1, hwm=864_000,
                  stored=seq_runs_of(stored), gaps=gaps)
    assert rep.max_seq == 864_000 and rep.unexplained == 0
    assert rep.stored + rep.gaps["evicted"] == rep.max_seq
    assert rep.gaps["evicted"] == 86_400  # half of the 2 low sensors' day
    # with the gap records the state never holds more than one open chunk's holes ...
    assert state.ranges_forgotten == 0 and widest <= 600
    assert len(state.ranges()) == 0 and state.watermark == 864_000
    assert len(state.to_bytes()) < 16
    # ... without them every evicted chunk leaves 600 holes for good: it overflows
    assert unsettled.ranges_forgotten > 10_000
    again = IdempotencyState.from_bytes(unsettled.to_bytes())
    assert again.ranges_forgotten == unsettled.ranges_forgotten  # persisted with the state
