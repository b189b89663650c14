"""Environment -> config overrides (edge frameworks, containers, PYMIGRATE__*) and the
secret-file permission warning."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from agent.envconfig import (
    apply_overrides,
    check_permissions,
    env_overrides,
    load_config,
    runtime_info,
)
from pymigrate.errors import ConfigError

BASE = {"device": {"id": "file-id"}, "sources": [{"type": "weather", "interval_s": 1.0}]}


def test_generic_overrides_parse_toml_values_and_nest() -> None:
    env = {"PYMIGRATE__METRICS__ENABLED": "true", "PYMIGRATE__METRICS__PORT": "9200",
           "PYMIGRATE__UPLINK__TRANSPORTS": '["mqtt", "coap"]',
           "PYMIGRATE__UPLINK__MQTT__HOST": "broker.example",
           "PYMIGRATE__SOURCES__0__INTERVAL_S": "0.5", "UNRELATED": "x"}
    out = apply_overrides(BASE, env)
    assert out["metrics"] == {"enabled": True, "port": 9200}
    assert out["uplink"] == {"transports": ["mqtt", "coap"], "mqtt": {"host": "broker.example"}}
    assert out["sources"][0]["interval_s"] == 0.5
    assert BASE["sources"][0]["interval_s"] == 1.0  # the input is not modified


@pytest.mark.parametrize(("env", "expected"), [
    ({"AWS_IOT_THING_NAME": "gg-thing-7"}, "gg-thing-7"),
    ({"IOTEDGE_DEVICEID": "edge-dev-3", "IOTEDGE_MODULEID": "pymigrateAgent"}, "edge-dev-3"),
    ({"AWS_IOT_THING_NAME": "gg", "PYMIGRATE__DEVICE__ID": "explicit"}, "explicit"),
    ({"PYMIGRATE_DEVICE_ID_FROM": "hostname"}, socket.gethostname()),
    ({}, "file-id"),
])
def test_device_id_precedence(env: dict[str, str], expected: str) -> None:
    assert apply_overrides(BASE, env)["device"]["id"] == expected


@pytest.mark.parametrize("var", ["PYMIGRATE__SOURCES__5__INTERVAL_S",
                                 "PYMIGRATE__SOURCES__X__INTERVAL_S",
                                 "PYMIGRATE__DEVICE__ID__SUB", "PYMIGRATE__METRICS____PORT"])
def test_bad_override_names_the_variable(var: str) -> None:
    with pytest.raises(ConfigError) as ei:
        apply_overrides(BASE, {var: "1"})
    assert ei.value.key == var


def test_override_order_is_deterministic() -> None:
    got = [v for v, _, _ in env_overrides({"PYMIGRATE__B__X": "1", "PYMIGRATE__A__X": "2",
                                            "IOTEDGE_DEVICEID": "d"})]
    assert got == ["IOTEDGE_DEVICEID", "PYMIGRATE__A__X", "PYMIGRATE__B__X"]


def test_runtime_info_per_framework_hides_secrets() -> None:
    gg = runtime_info({"AWS_IOT_THING_NAME": "t", "AWS_REGION": "eu-west-1", "SVCUID": "s3cr3t",
                       "AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT": "/ipc.sock"})
    assert gg == {"framework": "greengrass", "thing_name": "t", "region": "eu-west-1",
                  "ipc_socket": "/ipc.sock", "svcuid": "set"}
    assert "s3cr3t" not in repr(gg)
    az = runtime_info({"IOTEDGE_DEVICEID": "d", "IOTEDGE_MODULEID": "m",
                       "IOTEDGE_GATEWAYHOSTNAME": "gw", "IOTEDGE_WORKLOADURI": "unix:///w.sock"})
    assert az["framework"] == "azure-iot-edge" and az["module_id"] == "m"
    assert az["gateway_host"] == "gw" and az["workload_uri"] == "unix:///w.sock"
    assert runtime_info({"NOTIFY_SOCKET": "/run/x"})["framework"] == "systemd"
    assert runtime_info({"PYMIGRATE_CONTAINER": "1"})["framework"] == "container"


def test_permission_warning_only_for_readable_files_with_secrets(tmp_path: Path) -> None:
    f = tmp_path / "a.toml"
    f.write_text("x = 1\n")
    data = {"uplink": {"mqtt": {"password": "pw", "key_file": "/k"}},
            "sources": [{"type": "mqtt", "password": ""}]}
    f.chmod(0o644)
    assert check_permissions(f, data) == ["uplink.mqtt.password", "uplink.mqtt.key_file"]
    f.chmod(0o600)
    assert check_permissions(f, data) == []
    f.chmod(0o640)
    assert check_permissions(f, {"device": {"id": "x"}}) == []
    assert check_permissions(tmp_path / "missing.toml", data) == []


def test_load_config_applies_env_and_validates(tmp_path: Path) -> None:
    f = tmp_path / "agent.toml"
    f.write_text('[device]\nid = "from-file"\n[metrics]\nport = 9108\n')
    cfg = load_config(f, env={"IOTEDGE_DEVICEID": "edge-1", "PYMIGRATE__METRICS__PORT": "9300"})
    assert cfg.device.id == "edge-1" and cfg.metrics.port == 9300
    assert cfg.source_file == str(f)
    with pytest.raises(ConfigError) as ei:
        load_config(f, env={"PYMIGRATE__LOG__LEVEL": "loud"})
    assert ei.value.key == "log.level"
