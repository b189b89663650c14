"""Sources: simulated weather station, CSV replay, MQTT payload parsing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from agent.config import ReplaySource, WeatherSource
from agent.sources import (
    CsvReplay,
    CsvRows,
    SourceBatch,
    WeatherStation,
    build_source,
    parse_timestamp,
)
from agent.sources.mqtt import parse_payload
from pymigrate.clock import VirtualClock
from pymigrate.errors import ConfigError
from pymigrate.senml import to_senml_cbor, to_senml_json
from pymigrate.types import Priority, Reading


def test_weather_station_is_deterministic_and_quantized() -> None:
    clock = VirtualClock()
    a = WeatherStation(WeatherSource(sensors=12, seed=7), device_id="d", clock=clock)
    b = WeatherStation(WeatherSource(sensors=12, seed=7), device_id="d", clock=clock)
    ra, rb = a.sample(1_000), b.sample(1_000)
    assert ra == rb
    assert len({r.sensor for r in ra}) == 12  # channel names repeat with a suffix past 10
    for r in ra:
        assert math.isclose(r.value * 10, round(r.value * 10), abs_tol=1e-6)
    assert all(r.value >= 0 for r in ra if r.sensor.startswith("solar"))


def test_weather_alarm_threshold_makes_critical() -> None:
    ws = WeatherStation(WeatherSource(sensors=1, alarm_threshold=-100.0), device_id="d",
                        clock=VirtualClock())
    assert ws.sample(0)[0].priority == Priority.CRITICAL


async def test_weather_runs_on_virtual_time() -> None:
    clock = VirtualClock()
    got: list[SourceBatch] = []

    async def emit(b: SourceBatch) -> None:
        got.append(b)

    ws = WeatherStation(WeatherSource(sensors=3, interval_s=10.0), device_id="d", clock=clock,
                        max_ticks=5)
    import asyncio

    task = asyncio.create_task(ws.run(emit))
    await clock.advance(100.0)
    await task
    assert len(got) == 5
    ts = [b.readings[0].ts_ms for b in got]
    assert [t - ts[0] for t in ts] == [0, 10_000, 20_000, 30_000, 40_000]


@pytest.mark.parametrize(("text", "ms"), [
    ("2018-10-18T00:01:00Z", 1539820860000),
    ("2018-10-18T02:01:00+02:00", 1539820860000),
    ("2018-10-18T00:01:00", 1539820860000),
    ("1539820860", 1539820860000),
    ("1539820860.5", 1539820860500),
    ("1539820860000", 1539820860000),
])
def test_parse_timestamp(text: str, ms: int) -> None:
    assert parse_timestamp(text) == ms


@pytest.mark.parametrize("bad", ["", "yesterday", "nan", "inf"])
def test_parse_timestamp_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_timestamp(bad)


async def test_csv_replay(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    p.write_text("timestamp,a,b\n2026-01-01T00:00:00Z,1.5,\n"
                 "garbage,1,2\n2026-01-01T00:00:01Z,x,927.9630000000001\n\n")
    got: list[SourceBatch] = []

    async def emit(b: SourceBatch) -> None:
        got.append(b)

    src = build_source(ReplaySource(path=str(p)), device_id="dev", clock=VirtualClock())
    assert isinstance(src, CsvReplay)
    await src.run(emit)
    readings = [r for b in got for r in b.readings]
    rejects = [x for b in got for x in b.rejects]
    assert [(r.sensor, r.value) for r in readings] == [("a", 1.5), ("b", 927.9630000000001)]
    assert readings[0].ts_ms == 1767225600000
    assert sorted(r for r, _ in rejects) == ["bad_timestamp", "non_numeric"]
    assert src.done


async def test_csv_replay_loops_and_shifts(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    p.write_text("ts,a\n1000,1\n2000,2\n")
    clock = VirtualClock(start_ms=10_000_000)
    got: list[Reading] = []

    async def emit(b: SourceBatch) -> None:
        got.extend(b.readings)
        if len(got) >= 4:
            raise StopAsyncIteration

    src = CsvReplay(ReplaySource(path=str(p), loop=True), device_id="d", clock=clock)
    with pytest.raises(StopAsyncIteration):
        await src.run(emit)
    assert [r.ts_ms for r in got] == [1_000_000, 2_000_000, 3_000_000, 4_000_000]
    shifted: list[Reading] = []

    async def emit2(b: SourceBatch) -> None:
        shifted.extend(b.readings)

    await CsvReplay(ReplaySource(path=str(p), shift_to_now=True), device_id="d",
                    clock=clock).run(emit2)
    assert shifted[0].ts_ms == clock.time_ms()


def test_csv_replay_missing_or_headerless(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        CsvReplay(ReplaySource(path=str(tmp_path / "nope.csv")), device_id="d",
                  clock=VirtualClock())
    p = tmp_path / "h.csv"
    p.write_text("only\n")
    with pytest.raises(ConfigError):  # refused when built, not later inside a stage
        CsvReplay(ReplaySource(path=str(p)), device_id="d", clock=VirtualClock())


@pytest.mark.parametrize(("content", "problem"), [
    (b"", "is empty"),
    (b"\n\n", "is empty"),
    (b"ts;temp;hum\n2026-01-01T00:00:00Z;1;2\n", "separated by ';'"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary"),
    (b"ts,temp\n2026-01-01T00:00:00Z,21.5\n\xb0C,1\n", "line 3 is not UTF-8"),
    (b"1767225600,20.5,40\n1767225601,20.6,41\n", "is data, not a header"),
    (b"ts,temp,,hum\n1,2,3,4\n", "column 3 of the header has no name"),
    (b"ts,temp,temp\n1,2,3\n", "repeated column names in the header: temp"),
])
def test_csv_replay_unusable_files_name_key_and_problem(tmp_path: Path, content: bytes,
                                                        problem: str) -> None:
    p = tmp_path / "data.csv"
    p.write_bytes(content)
    with pytest.raises(ConfigError) as ei:
        CsvRows(p, key="sources[2].path")
    assert ei.value.key == "sources[2].path"
    assert problem in str(ei.value) and str(p) in str(ei.value)


def test_csv_replay_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a regular file"):
        CsvRows(tmp_path)


def test_csv_replay_extra_columns_are_counted_not_dropped_silently(tmp_path: Path) -> None:
    p = tmp_path / "x.csv"
    p.write_text("ts,temp\n1767225600,20.5,99,100\n1767225601,20.6,\n1767225602,20.7\n")
    rows = list(CsvRows(p))
    assert [v for _, v, _ in rows] == [[("temp", 20.5)], [("temp", 20.6)], [("temp", 20.7)]]
    assert [r for _, _, r in rows] == [[("extra_columns", "x.csv:2: 4 cells, header has 2")],
                                       [], []]


def _parse(data: bytes, fmt: str = "auto") -> tuple[list[Reading], list[tuple[str, str]]]:
    return parse_payload(data, fmt=fmt, topic="site/node1/temp", device_id="gw",
                         now_ms=1_767_225_600_000)


def test_mqtt_json_shapes() -> None:
    rs, rej = _parse(b'{"sensor": "t", "value": 21.5, "ts": "2026-01-01T00:00:00Z",'
                     b' "priority": "critical"}')
    assert rej == [] and rs[0].sensor == "t" and rs[0].priority == Priority.CRITICAL
    rs, _ = _parse(b"[{\"v\": 1}, {\"sensor\": \"h\", \"v\": true, \"t\": 1767225600}]")
    assert [(r.sensor, r.value) for r in rs] == [("temp", 1.0), ("h", 1.0)]
    assert rs[0].ts_ms == 1_767_225_600_000
    rs, _ = _parse(b'{"ts": 1767225600000, "a": 1, "b": 2.5}')
    assert [(r.sensor, r.value) for r in rs] == [("a", 1.0), ("b", 2.5)]
    rs, _ = _parse(b"42.0")
    assert rs[0].sensor == "temp" and rs[0].value == 42.0


@pytest.mark.parametrize(("payload", "reason"), [
    (b"{not json", "malformed_json"),
    (b'{"value": "hot"}', "non_numeric"),
    (b'{"ts": 1}', "no_values"),
    (b'["x"]', "unsupported_shape"),
    (b'{"value": 1, "ts": [1]}', "unsupported_shape"),
    (b'{"value": 1, "ts": "yesterday"}', "invalid_timestamp"),
    (b'{"value": 1, "ts": 1e300}', "invalid_timestamp"),
    (b'{"value": 1, "priority": "urgent"}', "invalid_priority"),
    (b'{"value": 1, "priority": 9}', "invalid_priority"),
    (b'{"value": 1, "sensor": null}', "invalid_sensor"),
    (b'{"value": 1e400}', "number_out_of_range"),
    (b'{"value": "\xff\xfe"}', "invalid_utf8"),
    (b"[" + b"1," * 10_000 + b"1]", "too_many_values"),
    (b"[" * 100_000 + b"]" * 100_000, "unsupported_shape"),
    (b"hello sensor", "plain_text"),
])
def test_mqtt_json_rejects_are_counted(payload: bytes, reason: str) -> None:
    rs, rej = _parse(payload, "json")
    assert rs == []
    assert rej == [(reason, "site/node1/temp")]


@pytest.mark.parametrize(("payload", "reason"), [
    (b"temperature is 21.5", "plain_text"),
    (b"  21 degrees", "malformed_json"),
    (b"\xff\x00garbage", "unknown_format"),
    (b"\x9f\x00garbage", "senml_malformed"),
    (b"\xa1\x00\x01", "senml_not_a_pack"),
    (b"[" * 100_000 + b"]" * 100_000, "unsupported_shape"),
    (b'[{"n": [' * 20_000, "senml_malformed"),
])
def test_mqtt_auto_format_rejects_have_distinct_reasons(payload: bytes, reason: str) -> None:
    rs, rej = _parse(payload, "auto")
    assert rs == [] and [r for r, _ in rej] == [reason]


def test_mqtt_payload_over_the_limit_is_refused_unread() -> None:
    import tracemalloc

    big = b"[" + b"21.5," * (17 * 1024 * 1024 // 5) + b"1]"  # a 17 MB JSON list
    tracemalloc.start()
    try:
        rs, rej = _parse(big)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rs == [] and rej == [("payload_too_large",
                                 f"site/node1/temp: {len(big)} bytes > 262144")]
    assert peak < 1_000_000  # nothing decoded: the agent's memory does not grow with it
    rs, rej = parse_payload(b'{"value": 1}', fmt="auto", topic="t", device_id="gw",
                            now_ms=1, max_bytes=8)
    assert rs == [] and rej[0][0] == "payload_too_large"


def test_mqtt_one_bad_sensor_does_not_sink_its_siblings() -> None:
    rs, rej = _parse(b'{"ts": 1767225600000, "a": 1, "b": "hot", "c": 2}', "json")
    assert [(r.sensor, r.value) for r in rs] == [("a", 1.0), ("c", 2.0)]
    assert rej == [("non_numeric", "site/node1/temp:b")]


def test_mqtt_senml_json_and_cbor() -> None:
    src = [Reading("gw", "temp", 1_767_225_600_000, 21.5),
           Reading("gw", "hum", 1_767_225_600_000, 40.0)]
    for data, fmt in ((to_senml_json(src), "auto"), (to_senml_cbor(src), "auto"),
                      (to_senml_json(src), "senml-json"), (to_senml_cbor(src), "senml-cbor")):
        rs, rej = _parse(data, fmt)
        assert rej == []
        assert sorted((r.sensor, r.value, r.ts_ms) for r in rs) == sorted(
            (r.sensor, r.value, r.ts_ms) for r in src)
    rs, rej = _parse(b"\x82\x00garbage", "auto")
    assert rs == [] and rej[0][0].startswith("senml_")


@pytest.mark.parametrize(("payload", "has"), [
    (b'{"value": 1}', False), (b'{"value": 1, "ts": 5}', True), (b"42", False),
    (b'[{"n": "a", "v": 1, "t": 0}]', True), (b"\x81\xa2\x00ab\x02\x01", True),
])
def test_payload_time_detection(payload: bytes, has: bool) -> None:
    from agent.sources.mqtt import payload_has_time

    assert payload_has_time(payload) is has
