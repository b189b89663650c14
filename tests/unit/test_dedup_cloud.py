"""Cloud-side dedup: idempotency ranges, conflict policies, gateway dedup."""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud.dedup import (
    ConflictPolicy,
    ConflictResolver,
    GatewayDeduper,
    IdempotencyState,
    quality_rank,
    resolve,
)
from pymigrate.errors import ConfigError, DecodeError
from pymigrate.types import Quality, Reading

T0 = 1_767_225_600_000


# -- idempotency ----------------------------------------------------------------------------
def test_ranges_merge_into_watermark() -> None:
    s = IdempotencyState()
    assert s.add_range(1, 10) == 10
    assert s.watermark == 10 and s.ranges() == []
    assert s.add_range(21, 30) == 10  # out of order: an exception above the watermark
    assert s.add_range(41, 50) == 10
    assert s.ranges() == [(21, 30), (41, 50)]
    assert s.contains(5) and s.contains(25) and s.contains(50)
    assert not s.contains(11) and not s.contains(35) and not s.contains(51)
    assert s.add_range(25, 45) == 10  # bridges 31..40, overlaps both
    assert s.ranges() == [(21, 50)]
    assert s.add_range(5, 20) == 10  # fills the gap: everything joins the watermark
    assert s.watermark == 50 and s.ranges() == []
    assert s.add_range(1, 50) == 0  # a resent batch adds nothing
    assert s.add(52) == 1 and s.add(51) == 1 and s.watermark == 52


def test_adjacent_ranges_coalesce_and_missing() -> None:
    s = IdempotencyState(10, [(20, 29), (30, 39), (50, 59)])
    assert s.ranges() == [(20, 39), (50, 59)]
    assert s.missing(5, 70) == [(11, 19), (40, 49), (60, 70)]
    assert s.missing(20, 39) == []
    assert s.missing(25, 55) == [(40, 49)]
    assert s.missing(1, 10) == []
    assert s.missing(61, 65) == [(61, 65)]
    assert s.missing(11, 15) == [(11, 15)]
    assert repr(s) == "IdempotencyState(watermark=10, ranges=[(20, 39), (50, 59)])"
    with pytest.raises(ValueError):
        s.add_range(5, 4)
    with pytest.raises(ValueError):
        IdempotencyState(-1)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 200), st.integers(0, 15)), max_size=60))
def test_matches_reference_set(ops: list[tuple[int, int]]) -> None:
    s = IdempotencyState()
    ref: set[int] = set()
    for a, n in ops:
        b = a + n
        new = set(range(a, b + 1)) - ref
        assert s.add_range(a, b) == len(new)
        missing = [x for lo, hi in s.missing(1, 230) for x in range(lo, hi + 1)]
        ref |= new
        assert set(missing) == set(range(1, 231)) - ref
    assert all(s.contains(x) == (x in ref) for x in range(0, 232) if x)
    rs = s.ranges()
    assert all(rs[i][1] + 1 < rs[i + 1][0] for i in range(len(rs) - 1))  # disjoint, gaps
    assert not rs or rs[0][0] > s.watermark + 1
    assert IdempotencyState.from_bytes(s.to_bytes()) == s


def test_serialization_compact_and_survives_restart() -> None:
    s = IdempotencyState()
    rng = random.Random(3)
    for k in range(0, 100_000, 100):
        if rng.random() < 0.97:
            s.add_range(k + 1, k + 100)
    blob = s.to_bytes()
    assert len(blob) < 16 + 6 * len(s.ranges())
    restored = IdempotencyState.from_bytes(blob)  # a new ingest process / another replica
    assert restored == s and restored.watermark == s.watermark
    assert all(restored.contains(x) == s.contains(x) for x in range(1, 100_001, 7))
    assert IdempotencyState.from_bytes(IdempotencyState().to_bytes()) == IdempotencyState()
    assert s != "x"


@pytest.mark.parametrize("blob", [b"", b"\x02\x00\x00", b"\x01\x80", b"\x01\x05\x01\x01\x00",
                                  b"\x01\x05\x00\x00", b"\x01" + b"\xff" * 12])
def test_malformed_state_rejected(blob: bytes) -> None:
    with pytest.raises(DecodeError) as ei:
        IdempotencyState.from_bytes(blob)
    assert ei.value.reason == "idempotency_state"


def test_floor_and_max_ranges_bound_memory() -> None:
    s = IdempotencyState(max_ranges=3)
    for k in range(5):
        s.add_range(10 * k + 5, 10 * k + 6)  # gaps: 1..4, 7..14, ...
    assert len(s.ranges()) == 3 and s.ranges_forgotten == 2 and s.gaps_closed == 0
    # overflow forgets the lowest *stored* ranges, it never closes a gap: a still-unsent
    # reading in a gap is written when it comes (no loss); a resend of a forgotten range
    # is written again and the store's unique key counts it as a duplicate
    assert not s.contains(3) and not s.contains(5) and s.missing(1, 16) == [(1, 16)]
    s.advance_floor(35)  # the device says everything below 35 is sent or evicted
    assert s.watermark == 36 and s.ranges() == [(45, 46)]
    s.advance_floor(10)  # never moves back
    assert s.watermark == 36


# -- conflicts ------------------------------------------------------------------------------
GOOD = Reading("d", "s", T0, 10.0, seq=1, quality=int(Quality.TIME_CORRECTED), uncert_ms=20)
WORSE = Reading("d", "s", T0, 12.0, seq=2,
                quality=int(Quality.TIME_CORRECTED | Quality.TIME_ANCHORED), uncert_ms=5)


@pytest.mark.parametrize(("policy", "stored", "incoming", "action", "value"), [
    ("first", GOOD, WORSE, "keep", 10.0),
    ("last", GOOD, WORSE, "replace", 12.0),
    ("best_quality", GOOD, WORSE, "keep", 10.0),
    ("best_quality", WORSE, GOOD, "replace", 10.0),
    ("average", GOOD, WORSE, "replace", 11.0),
])
def test_conflict_policies(policy: str, stored: Reading, incoming: Reading, action: str,
                           value: float) -> None:
    cr = ConflictResolver(policy)
    res = cr.resolve(stored, incoming)
    assert res.action == action and res.reading.value == value
    assert cr.counts["conflicts"] == 1
    assert cr.counts["replaced" if action == "replace" else "kept"] == 1
    assert cr.resolve(stored, stored).action == "identical"
    assert cr.counts["identical"] == 1 and cr.counts["conflicts"] == 1


def test_average_merges_flags_and_weights_by_count() -> None:
    out = resolve(ConflictPolicy.AVERAGE, GOOD, WORSE, count=3)
    assert out.value == pytest.approx((10.0 * 3 + 12.0) / 4)
    assert out.quality == GOOD.quality | WORSE.quality and out.uncert_ms == 20
    assert out.seq == GOOD.seq and out.ts_ms == GOOD.ts_ms


def test_quality_rank_order() -> None:
    fault = Reading("d", "s", T0, 1.0, quality=int(Quality.SENSOR_FAULT))
    uncertain = Reading("d", "s", T0, 1.0, quality=int(Quality.TIME_UNCERTAIN))
    tight = Reading("d", "s", T0, 1.0, quality=int(Quality.TIME_CORRECTED), uncert_ms=3)
    ranked = sorted([fault, uncertain, WORSE, GOOD, tight], key=quality_rank)
    assert ranked == [tight, GOOD, WORSE, uncertain, fault]


def test_nan_values_are_identical_not_conflicting() -> None:
    nan = float("nan")
    cr = ConflictResolver()
    a = Reading("d", "s", T0, nan)
    assert cr.resolve(a, Reading("d", "s", T0, nan)).action == "identical"


def test_unknown_policy_is_config_error() -> None:
    with pytest.raises(ConfigError) as ei:
        ConflictPolicy.parse("newest")
    assert ei.value.key == "dedup.conflict_policy"
    with pytest.raises(ConfigError) as ei:
        GatewayDeduper(100, "oldest")
    assert ei.value.key == "dedup.gateway_policy"
    with pytest.raises(ConfigError):
        GatewayDeduper(-1)


# -- redundant gateways ---------------------------------------------------------------------
def heard(gw: str, ts: int, value: float = 21.5, sensor: str = "lora:0004a30b/temp",
          **kw: object) -> Reading:
    return Reading(gw, sensor, ts, value, **kw)  # type: ignore[arg-type]


def test_same_sensor_two_gateways_kept_once() -> None:
    g = GatewayDeduper(500)
    a = heard("gw1", T0)
    b = heard("gw2", T0 + 180)  # the same frame, the other gateway's corrected clock
    res = g.offer([a])
    assert res.store == [a]
    res = g.offer([b])
    assert res.store == [] and res.dropped == [b] and res.replaced == []
    c = heard("gw3", T0 - 300)  # a third gateway hears it too
    assert g.offer([c]).dropped == [c]
    assert g.counts == {"kept": 1, "dropped": 2, "replaced": 0, "conflicts": 0}


def test_outside_tolerance_same_gateway_or_other_value_are_distinct() -> None:
    g = GatewayDeduper(500)
    a = heard("gw1", T0)
    far = heard("gw2", T0 + 800)  # outside tolerance
    same_gw = heard("gw1", T0 + 100, 21.6)  # the same gateway: a distinct sample
    other_value = heard("gw2", T0 + 50, 30.0)  # a different frame (match_values)
    other_sensor = heard("gw2", T0, sensor="lora:ffff/temp")
    res = g.offer([a, far, same_gw, other_value, other_sensor])
    assert res.store == [a, far, same_gw, other_value, other_sensor]
    assert len(g) == 5


def test_nearest_event_is_matched() -> None:
    g = GatewayDeduper(1000)
    a = heard("gw1", T0)
    b = heard("gw1", T0 + 900)  # two samples of gw1 close together (fast sensor)
    g.offer([a, b])
    copy_of_b = heard("gw2", T0 + 850)
    res = g.offer([copy_of_b])
    assert res.dropped == [copy_of_b]
    copy_of_a = heard("gw2", T0 + 60)
    assert g.offer([copy_of_a]).dropped == [copy_of_a]  # gw2 already used b's event


def test_best_quality_replaces_with_better_timed_copy() -> None:
    g = GatewayDeduper(2000, "best_quality")
    anchored = heard("gw1", T0 + 900, quality=int(Quality.TIME_ANCHORED | Quality.TIME_UNCERTAIN))
    good = heard("gw2", T0, quality=int(Quality.TIME_CORRECTED), uncert_ms=15)
    g.offer([anchored])
    res = g.offer([good])
    assert res.replaced == [(anchored, good)] and res.store == []
    worse = heard("gw3", T0 + 10, quality=int(Quality.TIME_CORRECTED), uncert_ms=80)
    assert g.offer([worse]).dropped == [worse]


def test_last_and_average_policies_for_gateway_copies() -> None:
    g = GatewayDeduper(1000, "last")
    a, b = heard("gw1", T0), heard("gw2", T0 + 100)
    g.offer([a])
    assert g.offer([b]).replaced == [(a, b)]
    g = GatewayDeduper(1000, "average", match_values=False)
    g.offer([heard("gw1", T0, 20.0)])
    g.offer([heard("gw2", T0 + 300, 21.0)])
    res = g.offer([heard("gw3", T0 + 600, 23.0)])
    (_, merged), = res.replaced
    assert merged.value == pytest.approx(64.0 / 3)  # three copies weighted equally
    assert merged.ts_ms == T0 + 300
    assert g.counts["conflicts"] == 2


def test_value_tolerance() -> None:
    g = GatewayDeduper(1000, value_tol=0.05)
    g.offer([heard("gw1", T0, 21.50)])
    assert g.offer([heard("gw2", T0, 21.53)]).dropped
    assert g.offer([heard("gw3", T0, 21.60)]).store


def test_horizon_and_per_sensor_bounds() -> None:
    g = GatewayDeduper(100, horizon_ms=10_000, max_per_sensor=5)
    g.offer([heard("gw1", T0 + k * 1000) for k in range(8)])
    assert len(g) == 5
    g.offer([heard("gw1", T0 + 60_000)])  # everything older than 10 s goes
    assert len(g) == 1
    late_copy = heard("gw2", T0)  # its event was forgotten: stored (a counted duplicate)
    assert g.offer([late_copy]).store == [late_copy]
    g.offer([heard("gw1", T0, sensor="other")])
    assert g.expire(T0 + 65_000) == 1  # "other" idle past the horizon
    assert g.expire(T0 + 200_000) == 1
    assert len(g) == 0


def test_custom_identity_key() -> None:
    # identity = the part after the gateway prefix, e.g. "gw1/eui-1/temp" -> "eui-1/temp"
    g = GatewayDeduper(500, key=lambda r: r.sensor.split("/", 1)[1])
    a = heard("gw1", T0, sensor="gw1/eui-1/temp")
    b = heard("gw2", T0 + 20, sensor="gw2/eui-1/temp")
    assert g.offer([a, b]).dropped == [b]


# -- restart and replicas: the state lives in the store -------------------------------------
class SharedStore:
    """What a store gives the ingest: per device a state blob and rows, in transactions."""

    def __init__(self) -> None:
        self.state: dict[str, bytes] = {}
        self.rows: dict[tuple[str, int], Reading] = {}
        self.lock = asyncio.Lock()  # the database's row lock / serializable transaction


async def replica_write(store: SharedStore, batch: list[Reading]) -> int:
    """One ingest replica: load the state, write the unseen seqs, save the state, commit."""
    dev = batch[0].device_id
    async with store.lock:
        blob = store.state.get(dev)
        st = IdempotencyState.from_bytes(blob) if blob else IdempotencyState()
        await asyncio.sleep(0)  # other replicas run meanwhile
        written = 0
        for lo, hi in st.missing(batch[0].seq, batch[-1].seq):
            for r in batch:
                if lo <= r.seq <= hi:
                    store.rows[(dev, r.seq)] = r
                    written += 1
        st.add_range(batch[0].seq, batch[-1].seq)
        store.state[dev] = st.to_bytes()
        return written


async def test_two_replicas_and_restarts_write_each_seq_once() -> None:
    rng = random.Random(11)
    store = SharedStore()
    batches = []
    for dev in ("gw1", "gw2"):
        seq = 0
        for _ in range(40):
            n = rng.randint(1, 20)
            batches.append([Reading(dev, "s", T0 + seq + i, 1.0, seq=seq + i + 1)
                            for i in range(n)])
            seq += n
    # redeliveries (lost acks, broker redelivery), out of order, over two replicas
    deliveries = batches + rng.sample(batches, 30)
    rng.shuffle(deliveries)
    half = len(deliveries) // 2
    written = await asyncio.gather(
        *(replica_write(store, b) for b in deliveries[:half]),  # replica A
        *(replica_write(store, b) for b in deliveries[half:]),  # replica B
    )
    total = sum(len(b) for b in batches)
    assert sum(written) == total == len(store.rows)
    # an ingest restart: a fresh process only has the store
    again = await asyncio.gather(*(replica_write(store, b) for b in batches))
    assert sum(again) == 0
    for dev in ("gw1", "gw2"):
        st = IdempotencyState.from_bytes(store.state[dev])
        assert st.ranges() == [] and st.watermark == max(
            r.seq for b in batches for r in b if r.device_id == dev)
