"""Issue 21 in-process: messages a user can act on, drops that are logged, sane simulators."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import structlog

from agent.config import ValidationConfig, WeatherSource, parse_agent_config
from agent.dedup import DedupConfig, Deduplicator
from agent.envconfig import load_config
from agent.preflight import check_paths, check_writable_dir
from agent.sources import WeatherStation
from agent.validate import Validator
from pymigrate.clock import VirtualClock
from pymigrate.configload import load_toml
from pymigrate.errors import ConfigError
from pymigrate.types import Reading


def test_a_non_utf8_config_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "agent.toml"
    p.write_bytes(b'[device]\nid = "gw"\n# 21 \xb0C outside\n')
    with pytest.raises(ConfigError) as ei:
        load_toml(p)
    assert f"{p}: line 3 is not UTF-8" in str(ei.value)
    with pytest.raises(ConfigError, match="is a directory"):
        load_toml(tmp_path)


def test_environment_overrides_are_named_in_errors(tmp_path: Path) -> None:
    p = tmp_path / "agent.toml"
    p.write_text("[buffer]\nbudget_bytes = 1000000\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p, env={"PYMIGRATE__BUFFER__BUDGET_BYTES": "abc"})
    assert ei.value.key == "buffer.budget_bytes"
    assert "PYMIGRATE__BUFFER__BUDGET_BYTES='abc'" in str(ei.value)
    with pytest.raises(ConfigError) as ei:  # list entries and framework variables too
        load_config(p, env={"PYMIGRATE__SOURCES": '[{type = "weather", sensors = 0}]'})
    assert "sources[0].sensors" in str(ei.value) and "PYMIGRATE__SOURCES=" in str(ei.value)
    with pytest.raises(ConfigError) as ei:
        load_config(p, env={"AWS_IOT_THING_NAME": "bad name!"})
    assert "AWS_IOT_THING_NAME='bad name!'" in str(ei.value)
    with pytest.raises(ConfigError) as ei:  # a file error stays a file error
        load_config(p, env={"PYMIGRATE__METRICS__PORT": "9200",
                            "PYMIGRATE__LOG__LEVEL": "loud"})
    assert "PYMIGRATE__LOG__LEVEL" in str(ei.value) and "METRICS" not in str(ei.value)


def test_data_dir_checks(tmp_path: Path) -> None:
    check_writable_dir(tmp_path / "new" / "deeper", key="device.data_dir")  # creatable
    assert not (tmp_path / "new").exists()  # and nothing created by checking
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        check_writable_dir(f, key="device.data_dir")
    with pytest.raises(ConfigError, match="which is a file"):
        check_writable_dir(f / "sub", key="device.data_dir")
    (tmp_path / "buffer.db").mkdir()
    cfg = parse_agent_config({"device": {"data_dir": str(tmp_path)}})
    with pytest.raises(ConfigError) as ei:
        check_paths(cfg)
    assert ei.value.key == "buffer.path" and "is not a file" in str(ei.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_read_only_data_dir(tmp_path: Path) -> None:  # pragma: no cover - CI runs as root
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    with pytest.raises(ConfigError, match="not writable"):
        check_writable_dir(ro, key="device.data_dir")


def test_exact_duplicates_are_logged_counted_and_throttled(
        caplog: pytest.LogCaptureFixture) -> None:
    dd = Deduplicator(DedupConfig(), clock=VirtualClock())
    r = Reading("gw", "temp", 1_767_225_600_000, 21.5)
    dd.filter([r])
    caplog.set_level(logging.INFO, "pymigrate.agent.dedup")
    for _ in range(2000):
        assert dd.filter([r, r]) == []
    dups = [rec.getMessage() for rec in caplog.records
            if rec.getMessage().startswith("duplicate readings dropped")]
    assert dups[0] == ("duplicate readings dropped: 2 (total 2), reason=duplicate, "
                       "e.g. sensor=temp ts_ms=1767225600000")
    assert dd.stats()["dropped"] == 4000
    assert 5 <= len(dups) < 20  # the first ones, then one per thousand dropped


def test_long_names_are_cut_in_rejection_logs() -> None:
    v = Validator(ValidationConfig(), now_ms=lambda: 1_767_225_600_000)
    name = "s" * 1_000_000
    with structlog.testing.capture_logs() as logs:
        assert v.filter([Reading("gw", name, 1_767_225_600_000, 1.0)]) == []
    assert v.rejected["bad_sensor_name"] == 1
    logged = logs[0]["sensor"]
    assert len(logged) < 200 and logged.endswith("(1000000 chars)")


def test_weather_station_never_reports_impossible_values() -> None:
    for seed in range(1, 4):
        ws = WeatherStation(WeatherSource(sensors=20, seed=seed), device_id="d",
                            clock=VirtualClock())
        for minute in range(0, 3 * 24 * 60, 5):
            for r in ws.sample(1_767_225_600_000 + minute * 60_000):
                if r.sensor.startswith(("wind_speed", "solar", "rain")):
                    assert r.value >= 0.0, (seed, r)
                if r.sensor.startswith("humidity"):
                    assert 0.0 <= r.value <= 100.0, (seed, r)
                if r.sensor.startswith("wind_dir"):
                    assert 0.0 <= r.value <= 360.0, (seed, r)


async def test_a_busy_coap_port_is_refused_naming_it() -> None:
    import socket

    from pymigrate.errors import TransportError
    from tests.conftest import free_port
    from transports.coap import CoapIngestServer

    async def handler(_: object) -> None:  # pragma: no cover - never called
        return None

    port = free_port(socket.SOCK_DGRAM)
    first = CoapIngestServer("127.0.0.1", port)
    await first.start(handler)  # type: ignore[arg-type]
    try:
        with pytest.raises(TransportError) as ei:
            await CoapIngestServer("127.0.0.1", port).start(handler)  # type: ignore[arg-type]
        assert ei.value.reason == "address_in_use" and not ei.value.retriable
        assert f"127.0.0.1:{port}" in str(ei.value)
    finally:
        await first.stop()


async def test_an_unreachable_coap_ingest_says_connection_refused(
        caplog: pytest.LogCaptureFixture) -> None:
    import socket

    from pymigrate.errors import TransportError
    from tests.conftest import free_port
    from transports.coap import CoapUplink

    port = free_port(socket.SOCK_DGRAM)
    up = CoapUplink(f"coap://127.0.0.1:{port}/ingest", device_id="d")
    caplog.set_level(logging.WARNING, "transports.coap")
    try:
        for _ in range(2):
            with pytest.raises(TransportError) as ei:
                await up.send(b"x", batch_id="b", timeout=5)
            assert f"coap://127.0.0.1:{port}/ingest" in str(ei.value)
            assert "refused" in str(ei.value).lower()
            assert "NetworkError" not in str(ei.value)
    finally:
        await up.close()
    logged = [r for r in caplog.records if "refused" in r.getMessage().lower()]
    assert len(logged) == 1  # once per failure streak, not per retry


async def test_an_unreachable_mqtt_broker_is_named_once(caplog: pytest.LogCaptureFixture) -> None:
    from pymigrate.errors import TransportError
    from tests.conftest import free_port
    from transports.config import parse_transport
    from transports.registry import build_uplinks

    port = free_port()
    up = build_uplinks([parse_transport("mqtt", {"host": "127.0.0.1", "port": port})], "d")[0]
    caplog.set_level(logging.WARNING)
    try:
        for _ in range(2):
            with pytest.raises(TransportError) as ei:
                await up.connect()
            assert f"127.0.0.1:{port}" in str(ei.value) and "refused" in str(ei.value)
    finally:
        await up.close()
    ours = [r for r in caplog.records if f"127.0.0.1:{port}" in r.getMessage()]
    assert len(ours) == 1 and ours[0].levelno == logging.WARNING


def test_paho_disconnect_noise_is_filtered(capsys: pytest.CaptureFixture[str]) -> None:
    from pymigrate.logsetup import setup_logging

    setup_logging("console", "info")
    logging.getLogger("mqtt").warning("Could not gracefully disconnect: %d. Forcing "
                                      "disconnection.", 4)
    logging.getLogger("mqtt").warning("something else")
    err = capsys.readouterr().err
    assert "gracefully" not in err and "something else" in err


def test_query_table_names_quality_flags() -> None:
    from cloud.query import format_table, quality_names
    from pymigrate.types import Quality

    assert quality_names(0) == "-"
    assert quality_names(int(Quality.TIME_CORRECTED | Quality.LATE)) == "time_corrected+late"
    assert quality_names(int(Quality.AGGREGATE) | 1024) == "aggregate+1024"
    table = format_table([Reading("gw", "t", 0, 1.0, quality=int(Quality.TIME_UNCERTAIN))])
    assert "time_uncertain" in table.splitlines()[1]


@pytest.mark.parametrize(("data", "key"), [
    ({"listeners": []}, "cloud.listeners"),
    ({"listeners": ["coap", "coap"]}, "cloud.listeners"),
    ({"sqlite": {"path": ""}}, "cloud.sqlite.path"),
    ({"sqlite": {"busy_timeout_ms": -1}}, "cloud.sqlite.busy_timeout_ms"),
    ({"postgres": {"command_timeout_s": 0}}, "cloud.postgres.command_timeout_s"),
    ({"postgres": {"connect_timeout_s": float("inf")}}, "cloud.postgres.connect_timeout_s"),
    ({"influx": {"timeout_s": -1}}, "cloud.influx.timeout_s"),
    ({"influx": {"max_lines": 0}}, "cloud.influx.max_lines"),
    ({"influx": {"max_retries": -1}}, "cloud.influx.max_retries"),
    ({"dedup": {"gateway_value_tol": -1}}, "cloud.dedup.gateway_value_tol"),
    ({"rate_limit": {"batches_per_s": float("inf")}}, "cloud.rate_limit.batches_per_s"),
])
def test_cloud_config_refuses_values_that_cannot_work(data: dict[str, object], key: str) -> None:
    from cloud.config import parse_cloud_config

    with pytest.raises(ConfigError) as ei:
        parse_cloud_config(data)
    assert ei.value.key == key
