"""Aggregation rules from TOML: valid configs parse, invalid ones name the key."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest

from agent.aggregate import (
    AggregationConfig,
    Aggregator,
    DeadbandWindow,
    TumblingWindow,
    parse_aggregation,
    parse_rule,
)
from pymigrate.clock import VirtualClock
from pymigrate.errors import ConfigError

GOOD = """
[aggregation]
wall_clock_close = true

[[aggregation.rules]]
name = "alarms"
match = ["alarm_*", "door"]
window = { type = "raw" }
raw_priority = "critical"

[[aggregation.rules]]
match = "wind_*"
window = { type = "deadband", abs = 0.5, percent = 2, heartbeat_s = 300 }

[[aggregation.rules]]
match = "*"
window = { type = "tumbling", size_s = 600 }
functions = ["min", "max", "avg", "count", "stddev", "p95"]
allowed_lateness_s = 30
late_policy = "drop"
lttb = 12
priority = "low"

[aggregation.degrade]
name = "coarse"
match = "*"
window = { type = "tumbling", size_s = 3600 }
functions = ["min", "max", "sum", "count"]
"""


def test_good_config_parses_to_typed_frozen_structs() -> None:
    cfg = parse_aggregation(tomllib.loads(GOOD)["aggregation"])
    assert isinstance(cfg, AggregationConfig)
    assert [r.rule_name for r in cfg.rules] == ["alarms", "deadband", "tumbling600s"]
    assert isinstance(cfg.rules[1].window, DeadbandWindow)
    assert isinstance(cfg.rules[2].window, TumblingWindow) and cfg.rules[2].lttb == 12
    assert cfg.degrade is not None and cfg.degrade.rule_name == "coarse"
    with pytest.raises(AttributeError):
        cfg.rules[0].name = "x"  # type: ignore[misc]
    Aggregator(cfg, clock=VirtualClock())


def test_default_is_no_rules() -> None:
    assert parse_aggregation({}).rules == []
    assert parse_aggregation(None) == AggregationConfig()


def test_derived_names() -> None:
    def name(window: dict[str, Any]) -> str:
        return parse_rule({"match": "*", "window": window, "functions": ["avg"]}).rule_name
    assert name({"type": "hopping", "size_s": 300, "hop_s": 60}) == "hopping300s60s"
    assert name({"type": "session", "gap_s": 1.5}) == "session1.5s"
    assert name({"type": "count", "count": 10}) == "count10"


def rule(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"match": "*", "window": {"type": "tumbling", "size_s": 60},
                            "functions": ["avg"]}
    base.update(kw)
    return base


@pytest.mark.parametrize(("rules", "key"), [
    ([rule(), rule(window={"type": "tumbling", "size_s": 0})],
     "aggregation.rules[1].window.size_s"),
    ([rule(), rule(name="x"), rule(window={"type": "sliding"})],
     "aggregation.rules[2].window.type"),
    ([rule(window={"type": "hopping", "size_s": 60, "hop_s": 120})],
     "aggregation.rules[0].window.hop_s"),
    ([rule(window={"type": "hopping", "size_s": 6000, "hop_s": 1})],
     "aggregation.rules[0].window.hop_s"),
    ([rule(window={"type": "tumbling", "size_s": 0.0005})], "aggregation.rules[0].window.size_s"),
    ([rule(functions=["avg", "median"])], "aggregation.rules[0].functions[1]"),
    ([rule(functions=["p100"])], "aggregation.rules[0].functions[0]"),
    ([rule(functions=["avg", "avg"])], "aggregation.rules[0].functions"),
    ([rule(functions=[])], "aggregation.rules[0].functions"),
    ([rule(lttb=2)], "aggregation.rules[0].lttb"),
    ([rule(lttb=10, window={"type": "hopping", "size_s": 60, "hop_s": 30})],
     "aggregation.rules[0].lttb"),
    ([rule(late_policy="keep")], "aggregation.rules[0].late_policy"),
    ([rule(allowed_lateness_s=-1)], "aggregation.rules[0].allowed_lateness_s"),
    ([rule(priority="urgent")], "aggregation.rules[0].priority"),
    ([rule(raw_priority="meh")], "aggregation.rules[0].raw_priority"),
    ([rule(match="")], "aggregation.rules[0].match"),
    ([rule(colour="red")], "aggregation.rules[0].colour"),
    ([rule(window={"type": "tumbling", "size_s": 60, "hop_s": 1})],
     "aggregation.rules[0].window.hop_s"),
    ([rule(window={"type": "deadband"}, functions=[])], "aggregation.rules[0].window"),
    ([rule(window={"type": "deadband", "abs": 1})], "aggregation.rules[0].functions"),
    ([rule(window={"type": "threshold"})], "aggregation.rules[0].window"),
    ([rule(window={"type": "threshold", "low": 5, "high": 1})],
     "aggregation.rules[0].window.low"),
    ([rule(window={"type": "threshold", "high": float("inf")})], "aggregation.rules[0].window"),
    ([rule(window={"type": "threshold", "high": 1, "size_s": 60}, functions=[])],
     "aggregation.rules[0].functions"),
    ([rule(window={"type": "threshold", "high": 1}, lttb=5)], "aggregation.rules[0].lttb"),
    ([rule(window={"type": "raw"})], "aggregation.rules[0].functions"),
    ([rule(name="a"), rule(name="a")], "aggregation.rules[1].name"),
    ([rule(), rule()], "aggregation.rules[1].name"),
    ([rule(percentile_rel_error=0.7)], "aggregation.rules[0].percentile_rel_error"),
])
def test_invalid_rules_name_the_key(rules: list[dict[str, Any]], key: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_aggregation({"rules": rules})
    assert ei.value.key == key, str(ei.value)
    assert str(ei.value).startswith(key)


def test_degrade_rule_errors() -> None:
    with pytest.raises(ConfigError) as ei:
        parse_aggregation({"degrade": rule(window={"type": "count", "count": 5})})
    assert ei.value.key == "aggregation.degrade.window"
    with pytest.raises(ConfigError) as ei:
        parse_aggregation({"degrade": rule(functions=["nope"])})
    assert ei.value.key == "aggregation.degrade.functions[0]"
    with pytest.raises(ConfigError) as ei:
        parse_rule(rule(functions=["nope"]), key="buffer.degrade_rule")
    assert ei.value.key == "buffer.degrade_rule.functions[0]"


def test_unknown_top_level_key() -> None:
    with pytest.raises(ConfigError) as ei:
        parse_aggregation({"rulez": []})
    assert ei.value.key == "aggregation.rulez"
