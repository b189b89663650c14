"""BufferConfig validation: errors name the key."""

from __future__ import annotations

import pytest

from agent.buffer import BufferConfig, Retention
from agent.codec import DEFAULT_CODEC
from pymigrate.configload import convert
from pymigrate.errors import ConfigError
from pymigrate.types import Priority


def test_defaults_are_valid() -> None:
    cfg = BufferConfig()
    assert cfg.budget_bytes == 64 * 1024 * 1024
    assert cfg.commit_window_ms == 100
    assert cfg.codec == DEFAULT_CODEC
    assert cfg.retention_s.ttl_ms(Priority.LOW) is None


@pytest.mark.parametrize(("key", "value"), [
    ("path", ""),
    ("budget_bytes", 1000),
    ("commit_window_ms", -1),
    ("commit_max_readings", 0),
    ("chunk_max_readings", 0),
    ("chunk_max_age_s", 0.0),
    ("chunk_max_age_s", float("nan")),
    ("codec", "nope"),
    ("cache_kib", 1),
])
def test_bad_value_names_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as ei:
        BufferConfig(**{key: value})  # type: ignore[arg-type]
    assert ei.value.key == f"buffer.{key}"


def test_retention_validated_and_converted() -> None:
    with pytest.raises(ConfigError) as ei:
        BufferConfig(retention_s=Retention(low=-5))
    assert ei.value.key == "buffer.retention_s.low"
    cfg = convert({"retention_s": {"low": 3600, "critical": 0}}, BufferConfig, section="buffer")
    assert cfg.retention_s.ttl_ms(Priority.LOW) == 3_600_000
    assert cfg.retention_s.ttl_ms(Priority.CRITICAL) is None  # 0 keeps forever


def test_unknown_key_rejected() -> None:
    with pytest.raises(ConfigError) as ei:
        convert({"budget": 5}, BufferConfig, section="buffer")
    assert ei.value.key == "buffer.budget"
    with pytest.raises(ConfigError) as ei:
        convert({"budget_bytes": 10}, BufferConfig, section="buffer")
    assert ei.value.key == "buffer.budget_bytes"
