"""Config: the embedded default validates; every error names the key and the problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import (
    AgentConfig,
    MqttSource,
    ReplaySource,
    WeatherSource,
    load_agent_config,
    parse_agent_config,
)
from pymigrate.cli import main
from pymigrate.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_default_config_is_valid() -> None:
    cfg = load_agent_config(ROOT / "configs" / "default.toml")
    assert isinstance(cfg, AgentConfig)
    assert cfg.device.data_dir == "./var"
    assert isinstance(cfg.sources[0], WeatherSource)
    assert cfg.uplink.transports == ["coap"]
    assert cfg.data_path("buffer.db") == Path("./var/buffer.db")
    assert cfg.data_path("/abs/x.db") == Path("/abs/x.db")


@pytest.mark.parametrize(("data", "key", "problem"), [
    ({"buffer": {"budget_bytes": "big"}}, "buffer.budget_bytes", "Expected `int`"),
    ({"buffer": {"bogus": 1}}, "buffer.bogus", "unknown key"),
    ({"bufer": {}}, "bufer", "unknown key"),
    ({"device": {"id": "bad id!"}}, "device.id", "must be"),
    ({"sources": [{"type": "weather", "sensors": 0}]}, "sources[0].sensors", "1..1000"),
    ({"sources": [{"type": "weather", "interval_s": 0}]}, "sources[0].interval_s", "> 0"),
    ({"sources": [{"type": "teleport"}]}, "sources[0].type", "Invalid value"),
    ({"sources": [{"type": "mqtt", "qos": 3}]}, "sources[0].qos", "0, 1 or 2"),
    ({"sources": [{"type": "mqtt", "format": "xml"}]}, "sources[0].format", "unknown"),
    ({"sources": [{"type": "mqtt", "port": 0}]}, "sources[0].port", "TCP port"),
    ({"sources": [{"type": "replay"}]}, "sources[0].path", "CSV path"),
    ({"sources": [{"type": "replay", "path": "x.csv", "speed": -1}]}, "sources[0].speed",
     ">= 0"),
    ({"uplink": {"transports": []}}, "uplink.transports", "at least one"),
    ({"uplink": {"transports": ["coap", "pigeon"]}}, "uplink.transports[1]", "unknown"),
    ({"priorities": [{"match": "t*", "priority": "urgent"}]}, "priorities[0].priority",
     "not one of"),
    ({"log": {"format": "xml"}}, "log.format", "console"),
    ({"log": {"level": "loud"}}, "log.level", "unknown level"),
    ({"pipeline": {"queue_size": 0}}, "pipeline.queue_size", ">= 1"),
    ({"pipeline": {"drain_timeout_s": -1}}, "pipeline.drain_timeout_s", ">= 0"),
    ({"retry": {"backoff_base_s": -1}}, "retry.backoff_base_s", "> 0"),
    ({"pipeline": {"status_interval_s": 0}}, "pipeline.status_interval_s", ">= 0.1"),
    ({"pipeline": {"status_interval_s": float("nan")}}, "pipeline.status_interval_s", ">= 0.1"),
    ({"metrics": {"port": 70000}}, "metrics.port", "TCP port"),
    ({"sources": [{"type": "replay", "path": "x.csv", "loop": True, "exit_when_done": True}]},
     "sources[0].exit_when_done", "never ends"),
    ({"sources": [{"type": "mqtt", "max_payload_bytes": 0}]}, "sources[0].max_payload_bytes",
     "64..67108864"),
    ({"validation": {"max_future_s": -1}}, "validation.max_future_s", ">= 0"),
    ({"validation": {"max_past_days": 0}}, "validation.max_past_days", ">= 0.001"),
    ({"validation": {"max_sensor_len": 0}}, "validation.max_sensor_len", "1..65535"),
    ({"jobs": {"health_interval_s": 0}}, "jobs.health_interval_s", ">= 0.01"),
    ({"jobs": {"heartbeat_s": -5}}, "jobs.heartbeat_s", "0 = off"),
    ({"jobs": {"check_delay_s": float("inf")}}, "jobs.check_delay_s", ">= 0"),
    ({"jobs": {"max_backlog_bytes": -1}}, "jobs.max_backlog_bytes", ">= 0"),
])
def test_config_errors_name_the_key(data: dict, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_agent_config(data)
    assert ei.value.key == key
    assert problem in str(ei.value)


def test_other_programs_sections_are_ignored() -> None:
    cfg = parse_agent_config({"cloud": {"store": "sqlite"}, "fleet": {}, "sources": [
        {"type": "mqtt"}, {"type": "replay", "path": "data.csv"}]})
    assert isinstance(cfg.sources[0], MqttSource)
    assert isinstance(cfg.sources[1], ReplaySource)


def test_check_config_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["agent", "--check-config", str(ROOT / "configs" / "default.toml")]) == 0
    assert "OK" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text("[buffer]\ncommit_window_ms = -5\n")
    assert main(["agent", "--check-config", str(bad)]) == 2
    assert "buffer.commit_window_ms" in capsys.readouterr().err
    broken = tmp_path / "broken.toml"
    broken.write_text("[buffer\n")
    assert main(["agent", "--config", str(broken), "--check-config"]) == 2
    assert "invalid TOML" in capsys.readouterr().err
    assert main(["agent", "--check-config", str(tmp_path / "missing.toml")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["agent"]) == 2
