"""Edge aggregation: rules matched by sensor pattern, windows, exact mergeable statistics,
report-by-exception, threshold pass-through, LTTB downsampling, persisted window state.

Output conventions (what the cloud receives):

- An aggregate is ``Reading(sensor=<the sensor>, ts_ms=<window start>, value=<value>,
  quality=Quality.AGGREGATE, agg=AggInfo(rule, fn, window_end_ms, count))``, one per
  function. Session and count windows use the first reading as start and the last
  reading + 1 ms as ``window_end_ms``.
- A window emitted before it was complete (``flush()`` on stop, a rule changed across a
  restart) carries ``AggInfo.rule = "<rule>~partial"`` (see :func:`is_partial`).
- LTTB points are the real samples, with ``agg=AggInfo(rule, "lttb", window_end_ms,
  count)`` and their own timestamps (no AGGREGATE flag: the values were measured).
- Deadband and threshold sends, ``pass_raw`` copies and readings matching no rule are the
  raw readings (``raw_priority`` may raise their priority); late readings sent raw carry
  ``Quality.LATE``.

Exactness: see :mod:`agent.aggregate.accumulator` (sum bit-identical to ``math.fsum``).
"""

from agent.aggregate.accumulator import Accumulator, QuantileSketch
from agent.aggregate.aggregator import Aggregator, AggregatorStats, SnapshotError
from agent.aggregate.config import (
    AggregationConfig,
    CountWindow,
    DeadbandWindow,
    HoppingWindow,
    RawWindow,
    RuleConfig,
    SessionWindow,
    ThresholdWindow,
    TumblingWindow,
    WindowConfig,
    parse_aggregation,
    parse_rule,
)
from agent.aggregate.lttb import lttb_indices
from agent.aggregate.reaggregate import make_degrader, reaggregate
from agent.aggregate.windows import PARTIAL_SUFFIX, is_partial

__all__ = [
    "PARTIAL_SUFFIX",
    "Accumulator",
    "AggregationConfig",
    "Aggregator",
    "AggregatorStats",
    "CountWindow",
    "DeadbandWindow",
    "HoppingWindow",
    "QuantileSketch",
    "RawWindow",
    "RuleConfig",
    "SessionWindow",
    "SnapshotError",
    "ThresholdWindow",
    "TumblingWindow",
    "WindowConfig",
    "is_partial",
    "lttb_indices",
    "make_degrader",
    "parse_aggregation",
    "parse_rule",
    "reaggregate",
]
