"""Edge deduplicator: redeliveries dropped, distinct readings kept, window bounded."""

from __future__ import annotations

import random
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.dedup import DedupConfig, Deduplicator, fingerprint
from pymigrate.clock import VirtualClock
from pymigrate.configload import convert
from pymigrate.errors import ConfigError
from pymigrate.types import Priority, Reading

T0 = 1_767_225_600_000


def rd(sensor: str = "t", ts: int = T0, value: float = 1.0, device: str = "dev1",
       **kw: object) -> Reading:
    return Reading(device, sensor, ts, value, **kw)  # type: ignore[arg-type]


def make(clock: VirtualClock | None = None, **kw: object) -> Deduplicator:
    return Deduplicator(DedupConfig(**kw), clock=clock or VirtualClock())  # type: ignore[arg-type]


def test_redelivery_dropped_order_preserved() -> None:
    d = make()
    batch = [rd("a", T0, 1.0), rd("b", T0, 2.0), rd("a", T0 + 1000, 3.0)]
    assert d.filter(batch) == batch
    # QoS 1 redelivery of the whole batch plus one new reading in the middle
    new = rd("c", T0, 4.0)
    assert d.filter([batch[0], new, batch[1], batch[2]]) == [new]
    # duplicate inside one call is dropped too; the first occurrence is kept
    x = rd("d", T0, 5.0)
    assert d.filter([x, x, x]) == [x]
    s = d.stats()
    assert (s["seen"], s["dropped"], s["passed"], s["entries"]) == (10, 5, 5, 5)


def test_fingerprint_ignores_seq_priority_and_corrected_ts() -> None:
    d = make()
    first = rd(ts=T0 + 5, raw_ts_ms=T0)
    # same source message after the clock model moved, with a seq and another priority
    again = rd(ts=T0 + 17, raw_ts_ms=T0, seq=42, priority=Priority.HIGH)
    assert d.filter([first]) == [first]
    assert d.filter([again]) == []
    assert fingerprint(first) == fingerprint(again)


def test_distinct_keys_kept() -> None:
    d = make()
    base = rd()
    variants = [
        rd(device="dev2"), rd(sensor="u"), rd(ts=T0 + 1), rd(value=1.0000000000000002),
        rd(value=-1.0), rd(value=float("nan")), rd(value=float("inf")),
    ]
    assert d.filter([base, *variants]) == [base, *variants]
    # -0.0 and 0.0 are the same value; every NaN is the same value
    assert d.filter([rd(value=0.0), rd(value=-0.0), rd(value=float("-nan"))]) == [rd(value=0.0)]


def test_separator_prevents_id_concatenation_collisions() -> None:
    d = make()
    a = rd(device="ab", sensor="c")
    b = rd(device="a", sensor="bc")
    assert d.filter([a, b]) == [a, b]


def test_quantization() -> None:
    d = make(value_quantum=0.01, ts_quantum_ms=1000)
    a = rd(ts=T0 + 100, value=20.001)
    same = rd(ts=T0 + 900, value=20.003)  # same second, same 0.01 step
    other_value = rd(ts=T0 + 100, value=20.02)
    other_second = rd(ts=T0 + 1100, value=20.001)
    assert d.filter([a, same, other_value, other_second]) == [a, other_value, other_second]


async def test_time_bound_expires_entries() -> None:
    clock = VirtualClock()
    d = make(clock, window_s=60.0)
    r = rd()
    assert d.filter([r]) == [r]
    await clock.advance(59.0)
    assert d.filter([r]) == []
    await clock.advance(2.0)  # 61 s after first sight: forgotten
    assert d.filter([r]) == [r]
    assert d.stats()["expired"] == 1


def test_count_bound_evicts_oldest() -> None:
    d = make(max_entries=100, window_s=1e9)
    rs = [rd(ts=T0 + i) for i in range(150)]
    assert d.filter(rs) == rs
    assert len(d) == 100
    assert d.stats()["evicted"] == 50
    assert d.filter(rs[:50]) == rs[:50]  # oldest 50 were evicted: not recognized
    assert d.filter(rs[100:]) == []  # the newest are still remembered


def test_zero_false_drops_on_large_random_set() -> None:
    rng = random.Random(7)
    d = make(max_entries=50_000, window_s=1e9)
    readings = list({(f"dev{rng.randrange(100)}", f"s{rng.randrange(20)}",
                      T0 + rng.randrange(86_400_000), round(rng.gauss(20, 5), 3)): None
                     for _ in range(200_000)})
    rs = [Reading(*k) for k in readings]
    kept = d.filter(rs)
    assert len(kept) == len(rs)  # all distinct -> none dropped
    # and redelivering a random 20% of the most recent ones drops exactly those
    recent = rs[-40_000:]
    again = rng.sample(recent, 8_000)
    assert d.filter(again) == []


def test_memory_fixed_and_measured() -> None:
    clock = VirtualClock()
    d = make(clock, max_entries=10_000, window_s=1e9)
    s = d.stats()
    assert 16 <= s["bytes_per_entry"] <= 40  # ring (8+8) + table (4 x 2..4) bytes
    tracemalloc.start()
    try:
        d.filter([rd(ts=T0 + i) for i in range(10_000)])
        before = tracemalloc.get_traced_memory()[0]
        for k in range(1, 6):
            d.filter([rd(ts=T0 + k * 10_000 + i) for i in range(10_000)])
        growth = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(d) == 10_000
    assert d.stats()["bytes"] == s["bytes"]
    assert growth < 50_000  # 50k more distinct readings, no per-entry growth


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.booleans()), min_size=1, max_size=300),
       st.integers(1, 16))
def test_matches_reference_fifo_window(ops: list[tuple[int, bool]], cap: int) -> None:
    """The open-addressing table behaves as a FIFO set of the last ``cap`` kept keys."""
    d = make(max_entries=cap, window_s=1e9)
    ref: list[int] = []
    for key, _ in ops:
        r = rd(ts=T0 + key)
        expect_new = key not in ref
        assert bool(d.filter([r])) is expect_new
        if expect_new:
            ref.append(key)
            if len(ref) > cap:
                ref.pop(0)
    assert len(d) == len(ref)


def test_disabled_is_a_pass_through() -> None:
    d = make(enabled=False)
    r = rd()
    assert d.filter([r, r]) == [r, r]
    d.remember([r])
    assert d.stats()["bytes_per_entry"] == 0.0
    assert d.stats()["seen"] == 2


def test_remember_and_clear() -> None:
    d = make()
    r = rd()
    d.remember([r])
    assert d.filter([r]) == []
    d.clear()  # what a restart does
    assert len(d) == 0
    assert d.filter([r]) == [r]


@pytest.mark.parametrize(("key", "value"), [
    ("window_s", 0), ("max_entries", 0), ("value_quantum", -1.0), ("ts_quantum_ms", 0),
])
def test_config_errors_name_the_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as ei:
        convert({key: value}, DedupConfig, section="dedup")
    assert ei.value.key == f"dedup.{key}"


def test_config_unknown_key() -> None:
    with pytest.raises(ConfigError) as ei:
        convert({"windw_s": 3}, DedupConfig, section="dedup")
    assert ei.value.key == "dedup.windw_s"


def test_many_series_and_colliding_home_slots() -> None:
    # more series than the prefix cache holds, and a tiny table so probe chains wrap
    d = make(max_entries=4, window_s=1e9)
    rs = [rd(sensor=f"s{i}") for i in range(5000)]
    assert d.filter(rs) == rs
    assert d.filter(rs[-4:]) == []
    assert d.filter(rs[:4]) == rs[:4]
    assert len(d._prefixes) <= 4096


def test_oldest_entry_sits_at_its_home_slot() -> None:
    # the invariant the eviction relies on, checked across a churned, tiny table
    d = make(max_entries=6, window_s=1e9)
    rng = random.Random(2)
    for _ in range(3000):
        d.filter([rd(ts=T0 + rng.randrange(40))])
        head = d._head
        assert d._table[d._fps[head] & d._mask] == head
