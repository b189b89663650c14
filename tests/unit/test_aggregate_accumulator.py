"""Exact, mergeable statistics: compared with statistics computed from the raw values."""

from __future__ import annotations

import math
import random
import statistics
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.aggregate import Accumulator, QuantileSketch

finite = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12)


def _acc(values: list[float], start: int = 0, alpha: float | None = None) -> Accumulator:
    acc = Accumulator(alpha)
    for i, v in enumerate(values):
        acc.add(start + i, v)
    return acc


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def _nasty(rng: random.Random, n: int) -> list[float]:
    # a large offset with small noise (cancellation trap) mixed with wildly varying magnitudes
    out = [927.9 + rng.gauss(0, 1e-3) for _ in range(n // 2)]
    out += [rng.choice([-1, 1]) * 10 ** rng.uniform(-6, 9) for _ in range(n - n // 2)]
    rng.shuffle(out)
    return out


def test_statistics_match_raw_exactly_on_nasty_values() -> None:
    rng = random.Random(7)
    for n in (1, 2, 3, 10, 1000):
        vals = _nasty(rng, n)
        acc = _acc(vals)
        assert acc.value("count") == n
        assert acc.value("min") == min(vals)
        assert acc.value("max") == max(vals)
        assert acc.value("sum") == math.fsum(vals)  # bit-identical, not approximately
        assert acc.value("first") == vals[0] and acc.value("last") == vals[-1]
        assert _rel(acc.value("avg"), statistics.mean(vals)) <= 1e-15
        if n >= 2:
            assert _rel(acc.value("stddev"), statistics.stdev(vals)) <= 1e-12
            assert _rel(acc.value("stddev_pop"), statistics.pstdev(vals)) <= 1e-12
            exact_var = statistics.variance([Fraction(v) for v in vals])
            assert acc.value("variance") == float(exact_var)  # correctly rounded
        else:
            assert acc.value("stddev") == 0.0


def test_variance_has_no_cancellation_error() -> None:
    # Naive sum-of-squares loses every digit here; the exact form does not.
    vals = [1e9 + 0.1 * i for i in range(100)]
    acc = _acc(vals)
    assert _rel(acc.value("stddev"), statistics.stdev(vals)) <= 1e-12


@settings(max_examples=60, deadline=None)
@given(st.lists(finite, min_size=1, max_size=60), st.integers(min_value=0, max_value=60))
def test_merge_equals_single_pass(vals: list[float], cut: int) -> None:
    cut = min(cut, len(vals))
    whole = _acc(vals)
    merged = _acc(vals[:cut]).merge(_acc(vals[cut:], start=cut))
    for fn in ("count", "min", "max", "sum", "avg", "first", "last", "variance"):
        a, b = whole.value(fn), merged.value(fn)
        assert a == b or (math.isnan(a) and math.isnan(b)), fn
    assert merged.value("sum") == math.fsum(vals)


def test_merge_into_empty_and_with_empty() -> None:
    a = _acc([1.0, 2.0])
    assert Accumulator().merge(a).value("sum") == 3.0
    assert a.merge(Accumulator()).value("count") == 2


def test_first_last_by_event_time_not_arrival() -> None:
    acc = Accumulator()
    acc.add(200, 2.0)
    acc.add(100, 1.0)
    acc.add(300, 3.0)
    acc.add(250, 9.0)
    assert acc.value("first") == 1.0 and acc.value("last") == 3.0


def test_non_finite_values_propagate() -> None:
    acc = _acc([1.0, math.inf])
    assert acc.value("sum") == math.inf and acc.value("avg") == math.inf
    assert math.isnan(acc.value("variance"))
    assert math.isnan(_acc([1.0, math.nan]).value("sum"))
    assert math.isnan(Accumulator().value("avg"))


def test_sum_overflow_is_infinite_not_an_error() -> None:
    acc = _acc([1.7e308, 1.7e308])
    assert acc.value("sum") == math.inf  # math.fsum raises OverflowError here
    assert _acc([-1.7e308, -1.7e308]).value("sum") == -math.inf


def test_state_round_trip_is_exact() -> None:
    vals = _nasty(random.Random(3), 200)
    acc = _acc(vals, alpha=0.01)
    back = Accumulator.from_state(acc.to_state())
    for fn in ("count", "min", "max", "sum", "avg", "first", "last", "stddev", "p50", "p99"):
        assert back.value(fn) == acc.value(fn), fn


def test_unknown_function_raises() -> None:
    with pytest.raises(ValueError):
        _acc([1.0]).value("p50")  # no sketch configured


@pytest.mark.parametrize("alpha", [0.01, 0.05])
def test_percentiles_within_stated_relative_error(alpha: float) -> None:
    rng = random.Random(11)
    vals = [rng.lognormvariate(3, 1) * rng.choice([-1, 1, 1, 1]) for _ in range(5000)]
    vals += [0.0] * 50
    sk = QuantileSketch(alpha)
    for v in vals:
        sk.add(v)
    srt = sorted(vals)
    for q in (0.01, 0.1, 0.25, 0.5, 0.9, 0.99, 0.999):
        exact = srt[math.floor(q * (len(srt) - 1))]
        got = sk.quantile(q)
        assert abs(got - exact) <= alpha * abs(exact) + 1e-12, q


def test_sketch_merge_and_errors() -> None:
    a, b = QuantileSketch(0.01), QuantileSketch(0.01)
    for v in range(1, 101):
        (a if v % 2 else b).add(float(v))
    a.add(math.nan)  # not rankable, ignored
    a.merge(b)
    assert a.count == 100
    assert abs(a.quantile(0.5) - 50) <= 0.5
    assert math.isnan(QuantileSketch().quantile(0.5))
    with pytest.raises(ValueError):
        a.merge(QuantileSketch(0.02))


def test_merge_carries_sketch() -> None:
    a = Accumulator()
    a.merge(_acc([1.0, 2.0, 3.0], alpha=0.01))
    assert a.sketch is not None and abs(a.value("p50") - 2.0) <= 0.02


def test_from_summary_rebuilds_mergeable_statistics() -> None:
    rng = random.Random(5)
    parts = [[rng.gauss(20, 3) for _ in range(50)] for _ in range(4)]
    total = Accumulator()
    for i, p in enumerate(parts):
        fine = _acc(p, start=i * 100)
        summary = {fn: fine.value(fn) for fn in ("sum", "min", "max", "variance",
                                                  "first", "last")}
        total.merge(Accumulator.from_summary(len(p), summary, ts_first=i * 100,
                                             ts_last=i * 100 + 49))
    flat = [v for p in parts for v in p]
    assert total.value("count") == len(flat)
    assert total.value("min") == min(flat) and total.value("max") == max(flat)
    assert _rel(total.value("sum"), math.fsum(flat)) <= 1e-15
    assert _rel(total.value("stddev"), statistics.stdev(flat)) <= 1e-9
    assert total.value("first") == parts[0][0] and total.value("last") == parts[-1][-1]
