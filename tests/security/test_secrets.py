"""Secrets never reach logs, metrics or health output; config files holding secrets with
loose permissions are warned about (without printing the secret).

The agent runs with MQTT and AMQP passwords against closed ports (so connection errors are
logged), the cloud ingest with a PostgreSQL DSN carrying a password that cannot connect;
every line of structlog and stdlib logging output is captured as JSON.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import stat
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from agent.config import parse_agent_config
from agent.envconfig import check_permissions
from agent.metrics import health, make_registry
from agent.supervisor import Agent
from pymigrate.logsetup import setup_logging
from tests.conftest import free_port

SECRET = "Hunter2-s3cr3t-Pa55"
TOKEN = "tok-ABCDEF-0123456789-secret"


def _agent_data(tmp_path: Path) -> dict[str, object]:
    return {
        "device": {"id": "sec-logs-1", "data_dir": str(tmp_path / "var")},
        "sources": [{"type": "weather", "sensors": 2, "interval_s": 0.05}],
        "buffer": {"chunk_max_age_s": 0.2, "commit_window_ms": 20},
        "uplink": {"transports": ["mqtt", "amqp"],
                   "mqtt": {"port": free_port(), "username": "dev", "password": SECRET,
                            "connect_timeout_s": 0.5},
                   "amqp": {"port": free_port(), "username": "dev", "password": SECRET,
                            "connect_timeout_s": 0.5}},
        "retry": {"backoff_base_s": 0.05, "backoff_cap_s": 0.2},
        "pipeline": {"drain_timeout_s": 0.5},
        "log": {"format": "json", "level": "debug"},
    }


def _no_secret(text: str) -> None:
    assert SECRET not in text
    assert TOKEN not in text


async def test_agent_logs_metrics_health_hold_no_secret(tmp_path: Path) -> None:
    out = io.StringIO()
    setup_logging("json", "debug", stream=out)
    cfg = parse_agent_config(_agent_data(tmp_path))
    agent = Agent(cfg)
    task = asyncio.create_task(agent.run())
    await asyncio.wait_for(agent.started.wait(), 10)
    await asyncio.sleep(2.0)  # connection failures and retries get logged meanwhile
    metrics = generate_latest(make_registry(agent, process=False)).decode()
    doc = json.dumps(health(agent), default=str) + json.dumps(agent.status(), default=str)
    agent.request_stop()
    await asyncio.wait_for(task, 20)
    text = out.getvalue()
    assert text.count("\n") >= 3, text  # something was logged (including the failures)
    assert "sec-logs-1" in metrics or "pymigrate" in metrics
    _no_secret(text)
    _no_secret(metrics)
    _no_secret(doc)


def test_structlog_masks_secret_keys() -> None:
    import structlog

    out = io.StringIO()
    setup_logging("json", "info", stream=out)
    structlog.get_logger("t").warning("connect", password=SECRET, token=TOKEN,
                                      dsn=f"postgresql://u:{SECRET}@h/db", user="u")
    line = json.loads(out.getvalue().strip().splitlines()[-1])
    assert line["user"] == "u"
    assert line["password"] == line["token"] == line["dsn"] == "***"
    _no_secret(out.getvalue())


async def test_cloud_start_failure_does_not_leak_dsn_password() -> None:
    from cloud.app import build_cloud_app

    out = io.StringIO()
    setup_logging("json", "debug", stream=out)
    app = build_cloud_app({
        "store": "postgres", "listeners": ["coap"],
        "postgres": {"dsn": f"postgresql://postgres:{SECRET}@127.0.0.1:{free_port()}/x",
                     "connect_timeout_s": 1.0},
        "coap": {"host": "127.0.0.1", "port": free_port()}})
    with pytest.raises(Exception) as ei:  # any error, as long as it is quiet
        await app.start()
    _no_secret(str(ei.value))
    _no_secret(repr(ei.value))
    _no_secret(out.getvalue())


@pytest.mark.parametrize(("mode", "warned"), [(0o644, True), (0o640, True), (0o600, False)])
def test_loose_permissions_on_secret_config_warned(tmp_path: Path, mode: int,
                                                   warned: bool) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(f'[uplink.mqtt]\npassword = "{SECRET}"\n')
    os.chmod(path, mode)
    out = io.StringIO()
    setup_logging("json", "info", stream=out)
    keys = check_permissions(path, {"uplink": {"mqtt": {"password": SECRET}}})
    assert bool(keys) is warned
    if warned:
        assert keys == ["uplink.mqtt.password"]
        assert "chmod 600" in out.getvalue()
        assert oct(stat.S_IMODE(mode)) in out.getvalue()
    _no_secret(out.getvalue())


def test_permissions_without_secrets_not_warned(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[device]\nid = "x"\n')
    os.chmod(path, 0o644)
    assert check_permissions(path, {"device": {"id": "x"}}) == []
