"""Mergeable window accumulators with exact sums.

Exactness, and how: every finite float is a dyadic rational ``num / 2**k``
(``float.as_integer_ratio``). The accumulator keeps the sum of values and the sum of
squares as *exact* integers over a common power-of-two scale (the scale only grows to the
finest value seen, so for sensor data the integers stay around 60-150 bits). Finalising
divides two Python ints, which CPython rounds correctly, so:

- ``sum`` is the correctly rounded exact sum: bit-identical to ``math.fsum`` of the raw
  values, whatever their order or how windows were merged;
- ``avg`` is the exact mean, correctly rounded (within 0.5 ulp);
- ``variance``/``variance_pop`` are ``(n*S2 - S1**2) / (n*(n-1))`` (resp. ``n**2``) evaluated
  exactly and rounded once, so there is no cancellation error at all (this is stronger
  than Welford's update or Chan's parallel merge, which both round at every step);
  ``stddev`` is the square root of that (within ~1 ulp);
- ``min``/``max``/``count``/``first``/``last`` are exact.

Merging two accumulators (``merge``) adds the integers: the result is identical to
having accumulated the union of the readings in one window. Percentiles (``pNN``) use a
mergeable log-bucket sketch (DDSketch): the returned value is within a relative error
``alpha`` (``percentile_rel_error``) of the exact order statistic at rank
``floor(q*(n-1))``; values with ``|x| < 1e-9`` are reported as 0.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

__all__ = ["Accumulator", "QuantileSketch"]

_TINY = 1e-9


class QuantileSketch:
    """DDSketch with unbounded stores: relative accuracy ``alpha`` on every quantile."""

    __slots__ = ("_lg", "alpha", "gamma", "neg", "pos", "zero")

    def __init__(self, alpha: float = 0.01) -> None:
        self.alpha = alpha
        self.gamma = (1.0 + alpha) / (1.0 - alpha)
        self._lg = math.log(self.gamma)
        self.pos: dict[int, int] = {}
        self.neg: dict[int, int] = {}
        self.zero = 0

    def add(self, x: float, n: int = 1) -> None:
        if not math.isfinite(x):
            return  # counted in the accumulator's ``n``; not rankable here
        a = abs(x)
        if a < _TINY:
            self.zero += n
            return
        i = math.ceil(math.log(a) / self._lg)
        store = self.pos if x > 0 else self.neg
        store[i] = store.get(i, 0) + n

    def merge(self, other: QuantileSketch) -> None:
        if other.alpha != self.alpha:
            raise ValueError("cannot merge sketches of different accuracy")
        for mine, theirs in ((self.pos, other.pos), (self.neg, other.neg)):
            for i, c in theirs.items():
                mine[i] = mine.get(i, 0) + c
        self.zero += other.zero

    @property
    def count(self) -> int:
        return self.zero + sum(self.pos.values()) + sum(self.neg.values())

    def _value(self, i: int) -> float:
        return 2.0 * self.gamma ** i / (self.gamma + 1.0)

    def quantile(self, q: float) -> float:
        """The value at rank ``floor(q*(n-1))`` within relative error ``alpha``."""
        n = self.count
        if n == 0:
            return math.nan
        rank = math.floor(q * (n - 1))
        seen = 0
        for i in sorted(self.neg, reverse=True):  # most negative first
            seen += self.neg[i]
            if seen > rank:
                return -self._value(i)
        seen += self.zero
        if seen > rank:
            return 0.0
        for i in sorted(self.pos):
            seen += self.pos[i]
            if seen > rank:
                return self._value(i)
        return self._value(max(self.pos))  # pragma: no cover - rank < n always hits

    def to_state(self) -> list[Any]:
        return [self.alpha, self.zero, sorted(self.pos.items()), sorted(self.neg.items())]

    @classmethod
    def from_state(cls, st: list[Any]) -> QuantileSketch:
        sk = cls(float(st[0]))
        sk.zero = int(st[1])
        sk.pos = {int(i): int(c) for i, c in st[2]}
        sk.neg = {int(i): int(c) for i, c in st[3]}
        return sk


def _div(num: int, den: int) -> float:
    """Correctly rounded num/den (CPython int true division), +-inf on overflow."""
    try:
        return num / den
    except OverflowError:
        return math.inf if (num > 0) == (den > 0) else -math.inf


class Accumulator:
    """Exact, mergeable statistics of one window of one series."""

    __slots__ = ("first_ts", "first_v", "k1", "k2", "last_ts", "last_v", "max", "min", "n",
                 "s1", "s2", "sketch", "special")

    def __init__(self, sketch_alpha: float | None = None) -> None:
        self.n = 0
        self.s1 = 0  # sum of values   = s1 / 2**k1 (exact)
        self.k1 = 0
        self.s2 = 0  # sum of squares  = s2 / 2**k2 (exact)
        self.k2 = 0
        self.special = 0.0  # sum of non-finite values (inf/nan propagate, never hidden)
        self.min = math.inf
        self.max = -math.inf
        self.first_ts = 0
        self.first_v = math.nan
        self.last_ts = 0
        self.last_v = math.nan
        self.sketch = QuantileSketch(sketch_alpha) if sketch_alpha else None

    def add(self, ts_ms: int, value: float) -> None:
        """Add one reading (event time ``ts_ms``)."""
        x = float(value)
        if self.n == 0:
            self.first_ts = self.last_ts = ts_ms
            self.first_v = self.last_v = x
        elif ts_ms < self.first_ts:
            self.first_ts, self.first_v = ts_ms, x
        elif ts_ms >= self.last_ts:  # equal timestamps: the later arrival is "last"
            self.last_ts, self.last_v = ts_ms, x
        self.n += 1
        if x < self.min:
            self.min = x
        if x > self.max:
            self.max = x
        if self.sketch is not None:
            self.sketch.add(x)
        if not math.isfinite(x):
            self.special += x
            return
        num, den = x.as_integer_ratio()
        k = den.bit_length() - 1
        if k > self.k1:
            self.s1 <<= k - self.k1
            self.k1 = k
        self.s1 += num << (self.k1 - k)
        k *= 2
        if k > self.k2:
            self.s2 <<= k - self.k2
            self.k2 = k
        self.s2 += (num * num) << (self.k2 - k)

    def merge(self, other: Accumulator) -> Accumulator:
        """Fold ``other`` into this accumulator (exact); returns self."""
        if other.n == 0:
            return self
        if self.n == 0 or other.first_ts < self.first_ts:
            self.first_ts, self.first_v = other.first_ts, other.first_v
        if self.n == 0 or other.last_ts >= self.last_ts:
            self.last_ts, self.last_v = other.last_ts, other.last_v
        self.n += other.n
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.special += other.special
        self.s1, self.k1 = _add_scaled(self.s1, self.k1, other.s1, other.k1)
        self.s2, self.k2 = _add_scaled(self.s2, self.k2, other.s2, other.k2)
        if other.sketch is not None:
            if self.sketch is None:
                self.sketch = QuantileSketch(other.sketch.alpha)
            self.sketch.merge(other.sketch)
        return self

    # ---- finalisation -------------------------------------------------------------------

    @property
    def sum(self) -> float:
        if self.special or math.isnan(self.special):
            return self.special
        return _div(self.s1, 1 << self.k1)

    @property
    def mean(self) -> float:
        if self.n == 0:
            return math.nan
        if self.special or math.isnan(self.special):
            return self.special
        return _div(self.s1, self.n << self.k1)

    def _m2_num(self) -> tuple[int, int]:
        """Exact ``n*S2 - S1**2`` as (integer numerator, power-of-two exponent)."""
        m = max(self.k2, 2 * self.k1)
        num = ((self.n * self.s2) << (m - self.k2)) - ((self.s1 * self.s1) << (m - 2 * self.k1))
        return num, m

    def variance(self, *, sample: bool = True) -> float:
        """Sample (n-1) or population variance, exact then rounded once; 0.0 when n < 2."""
        if self.special or math.isnan(self.special):
            return math.nan
        if self.n < 2:
            return 0.0
        num, m = self._m2_num()
        den = self.n * (self.n - 1 if sample else self.n)
        return _div(max(num, 0), den << m)

    def value(self, fn: str) -> float:
        """The finalised value of ``fn`` (a name from the rule's ``functions``)."""
        if fn == "count":
            return float(self.n)
        if fn == "sum":
            return self.sum
        if fn in ("avg", "mean"):
            return self.mean
        if fn == "min":
            return self.min
        if fn == "max":
            return self.max
        if fn == "first":
            return self.first_v
        if fn == "last":
            return self.last_v
        if fn == "variance":
            return self.variance()
        if fn == "variance_pop":
            return self.variance(sample=False)
        if fn == "stddev":
            return math.sqrt(self.variance())
        if fn == "stddev_pop":
            return math.sqrt(self.variance(sample=False))
        if fn.startswith("p") and self.sketch is not None:
            return self.sketch.quantile(float(fn[1:]) / 100.0)
        raise ValueError(f"cannot compute {fn!r} from this accumulator")

    # ---- rebuilding from finalised aggregates (re-aggregation) ------------------------

    @classmethod
    def from_summary(cls, n: int, values: dict[str, float], *, ts_first: int,
                     ts_last: int) -> Accumulator:
        """An accumulator standing for ``n`` readings known only by finalised aggregates.

        Whatever is present is carried: ``sum`` (or ``avg*count``), ``variance``/``stddev``
        (sample or population), ``min``, ``max``, ``first``, ``last``. The sum of squares is
        rebuilt from variance and mean, rounded to 2**-64 of the scale (so merging
        aggregates is as exact as the aggregates themselves, no more).
        """
        acc = cls()
        acc.n = n
        acc.min = values.get("min", math.inf)
        acc.max = values.get("max", -math.inf)
        acc.first_ts, acc.first_v = ts_first, values.get("first", math.nan)
        acc.last_ts, acc.last_v = ts_last, values.get("last", math.nan)
        if "sum" in values:
            s = Fraction(values["sum"])
        elif "avg" in values or "mean" in values:
            s = Fraction(values.get("avg", values.get("mean", 0.0))) * n
        else:
            return acc
        m2: Fraction | None = None
        for fn, sample, sq in (("variance", True, False), ("stddev", True, True),
                               ("variance_pop", False, False), ("stddev_pop", False, True)):
            if fn in values and n >= 1:
                v = Fraction(values[fn]) ** 2 if sq else Fraction(values[fn])
                m2 = v * (n - 1 if sample else n)
                break
        acc.k1 = s.denominator.bit_length() - 1  # a float times an int is dyadic: exact
        acc.s1 = int(s * (1 << acc.k1))
        if m2 is not None and n >= 1:
            acc.k2 = 2 * acc.k1 + 64
            acc.s2 = round((m2 + s * s / n) * (1 << acc.k2))
        return acc

    # ---- persistence --------------------------------------------------------------------

    def to_state(self) -> list[Any]:
        # ints beyond 64 bits do not fit msgpack: carried as hex text
        return [self.n, format(self.s1, "x"), self.k1, format(self.s2, "x"), self.k2,
                self.special, self.min, self.max, self.first_ts, self.first_v,
                self.last_ts, self.last_v,
                self.sketch.to_state() if self.sketch is not None else None]

    @classmethod
    def from_state(cls, st: list[Any]) -> Accumulator:
        acc = cls()
        acc.n = int(st[0])
        acc.s1 = int(st[1], 16)
        acc.k1 = int(st[2])
        acc.s2 = int(st[3], 16)
        acc.k2 = int(st[4])
        acc.special = float(st[5])
        acc.min, acc.max = float(st[6]), float(st[7])
        acc.first_ts, acc.first_v = int(st[8]), float(st[9])
        acc.last_ts, acc.last_v = int(st[10]), float(st[11])
        acc.sketch = QuantileSketch.from_state(st[12]) if st[12] is not None else None
        return acc


def _add_scaled(a: int, ka: int, b: int, kb: int) -> tuple[int, int]:
    if ka >= kb:
        return a + (b << (ka - kb)), ka
    return (a << (kb - ka)) + b, kb
