"""SIGHUP reload: diff, classification (live vs restart), refusal keeps the running config."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from agent.config import parse_agent_config
from agent.reload import diff_keys, reload_agent
from agent.supervisor import Agent
from pymigrate.clock import VirtualClock
from tests.unit.fakes_uplink import FakeUplink

BASE = """
[device]
id = "r-dev"
data_dir = "{d}"

[[sources]]
type = "weather"
interval_s = 1.0
"""


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Agent, Path]:
    f = tmp_path / "agent.toml"
    f.write_text(BASE.format(d=tmp_path))
    from agent.envconfig import load_config

    clock = VirtualClock()
    agent = Agent(load_config(f, env={}), clock=clock, uplinks=[FakeUplink(clock)])
    return agent, f


def test_diff_keys() -> None:
    a = parse_agent_config({})
    b = parse_agent_config({"log": {"level": "debug"}, "uplink": {"mqtt": {"host": "h"}},
                            "sources": [{"type": "weather"}]})
    assert diff_keys(a, b) == ["log.level", "sources", "uplink.mqtt", "uplink.mqtt.host"]
    assert diff_keys(a, msgspec.structs.replace(a, source_file="x")) == []


async def test_live_and_restart_keys(setup: tuple[Agent, Path]) -> None:
    agent, f = setup
    f.write_text(BASE.format(d=f.parent).replace("interval_s = 1.0", "interval_s = 2.0") + """
[retry]
profile = "battery"
low_battery_pct = 30.0
max_attempts = 5
breaker_failures = 3

[pipeline]
drain_timeout_s = 3.0
queue_size = 8

[validation]
allow_nan = true

[metrics]
port = 9999
""")
    logs: list[tuple[str, str]] = []
    res = await reload_agent(agent, env={}, relog=lambda fm, lv: logs.append((fm, lv)))
    assert res.ok
    assert res.applied == ["metrics.port", "pipeline.drain_timeout_s", "retry.low_battery_pct",
                           "retry.max_attempts", "retry.profile", "validation.allow_nan"]
    assert res.restart_required == ["pipeline.queue_size", "retry.breaker_failures", "sources"]
    assert logs == []  # log section unchanged
    c = agent.config
    assert c.retry.profile == "battery" and c.retry.breaker_failures == 6
    assert c.pipeline.drain_timeout_s == 3.0 and c.pipeline.queue_size == 64
    assert c.metrics.port == 9999  # no server running: only recorded
    assert agent.uploader.power.profile == "battery"
    assert agent.uploader.power.low_battery_pct == 30.0
    assert agent.uploader.cfg.max_attempts == 5
    assert agent.validator.config.allow_nan is True
    assert c.sources[0].interval_s == 1.0  # restart-only: still the running value


async def test_metrics_toggle_needs_restart(setup: tuple[Agent, Path]) -> None:
    agent, f = setup
    f.write_text(BASE.format(d=f.parent) + "[metrics]\nenabled = true\nport = 9111\n")
    res = await reload_agent(agent, env={})
    assert res.ok and res.applied == []
    assert res.restart_required == ["metrics.enabled", "metrics.port"]
    assert agent.config.metrics.enabled is False


@pytest.mark.parametrize("text", ["", "[log\nlevel=", '[log]\nlevel = "loud"\n',
                                  '[nope]\nx = 1\n'])
async def test_bad_config_refused(setup: tuple[Agent, Path], text: str) -> None:
    agent, f = setup
    before = agent.config
    f.write_text(text)
    res = await reload_agent(agent, env={})
    assert not res.ok and res.error
    assert agent.config is before


async def test_missing_file_and_no_source(setup: tuple[Agent, Path]) -> None:
    agent, f = setup
    f.unlink()
    assert not (await reload_agent(agent, env={})).ok
    agent.config = msgspec.structs.replace(agent.config, source_file="")
    res = await reload_agent(agent, env={})
    assert not res.ok and "not started from a config file" in res.error
