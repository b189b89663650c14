"""Build source objects from their config structs (phase two)."""

from __future__ import annotations

from agent.config import MqttSource, ReplaySource, SourceConfig, WeatherSource
from agent.sources.base import Source
from pymigrate.clock import Clock


def build_source(cfg: SourceConfig, *, device_id: str, clock: Clock) -> Source:
    if isinstance(cfg, WeatherSource):
        from agent.sources.weather import WeatherStation

        return WeatherStation(cfg, device_id=device_id, clock=clock)
    if isinstance(cfg, ReplaySource):
        from agent.sources.replay import CsvReplay

        return CsvReplay(cfg, device_id=device_id, clock=clock)
    if isinstance(cfg, MqttSource):
        from agent.sources.mqtt import MqttSourceStage

        return MqttSourceStage(cfg, device_id=device_id, clock=clock)
    raise TypeError(f"unknown source config {type(cfg).__name__}")  # pragma: no cover
