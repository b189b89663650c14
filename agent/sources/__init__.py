"""Reading sources: simulated weather station, MQTT subscription, CSV replay."""

from agent.sources.base import Emit, Source, SourceBatch
from agent.sources.build import build_source
from agent.sources.replay import CsvReplay, CsvRows, parse_timestamp
from agent.sources.weather import WeatherStation

__all__ = ["CsvReplay", "CsvRows", "Emit", "Source", "SourceBatch", "WeatherStation",
           "build_source", "parse_timestamp"]
