"""A firmware rollout end to end on the built-in MQTT backend: `fleet sign-firmware` makes
the signed document, the real coordinator sends it over Mosquitto, a real agent with
``[jobs.firmware]`` downloads the image from a loopback HTTP server (cut halfway once,
resumed), verifies it, installs it with the shipped A/B hook, passes the health check,
and `fleet status --show-devices` shows the device's phase and bytes."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_agent_config
from agent.supervisor import Agent
from cloud.fleet.cli import build_parser, main, serve
from cloud.fleet.coordinator import Coordinator
from cloud.ingest import IngestService
from cloud.stores import SqliteStore
from tests.support import artifact
from tests.support.loopback import LoopbackUplink
from transports.jobs_security import generate_keypair

IMAGE = os.urandom(200_000)

pytestmark = pytest.mark.integration
HOOK = artifact.HOOK
server = artifact.server  # fixture: loopback HTTP artifact server

CONFIG = """
[device]
id = "{dev}"
data_dir = "{data}"

[[sources]]
type = "weather"
sensors = 2
interval_s = 0.05

[jobs]
enabled = true
host = "{host}"
port = {port}
prefix = "{prefix}"
check_delay_s = 0.05
health_interval_s = 0.05
heartbeat_s = 0
verify_key = "{verify_key}"

[jobs.firmware]
enabled = true
verify_key = "{release_pub}"
install_cmd = ["{hook}", "install"]
health_cmd = ["{hook}", "health"]
rollback_cmd = ["{hook}", "rollback"]
health_delay_s = 0
cmd_timeout_s = 10

[log]
level = "warning"
"""


async def test_firmware_rollout_over_mqtt_reaches_a_real_agent(
        mosquitto: tuple[str, int], tmp_path: Path, server: Any,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("FW_ROOT", str(tmp_path / "fw"))
    host, port = mosquitto
    prefix = f"pmfw-{uuid.uuid4().hex[:8]}"
    dev = f"gw-{uuid.uuid4().hex[:6]}"
    job_key, job_pub = generate_keypair(tmp_path / "keys", "jobs")
    op_key, op_pub = generate_keypair(tmp_path / "keys", "operator")
    rel_key, rel_pub = generate_keypair(tmp_path / "keys", "release")
    srv = await server(IMAGE, drop_once=True)
    image = tmp_path / "fw-2.0.bin"
    image.write_bytes(IMAGE)
    assert main(["sign-firmware", str(image), "--key", str(rel_key), "--url", srv.url,
                 "--version", "2.0"]) == 0
    document = json.loads(capsys.readouterr().out)["document"]
    assert document["hook"] == "firmware" and document["args"]["size"] == len(IMAGE)

    cfg_path = tmp_path / "agent.toml"
    cfg_path.write_text(CONFIG.format(dev=dev, data=tmp_path / "var", host=host, port=port,
                                      prefix=prefix, verify_key=job_pub, release_pub=rel_pub,
                                      hook=HOOK))
    db = str(tmp_path / "fleet.db")
    devs = tmp_path / "devices.json"
    devs.write_text(json.dumps([{"device_id": dev}]))
    assert await asyncio.to_thread(main, ["add-devices", "--store", db, "--file", str(devs)]) == 0
    args = build_parser().parse_args(["serve", "--store", db, "--broker", f"{host}:{port}",
                                      "--prefix", prefix, "--signing-key", str(job_key),
                                      "--control-key", str(op_pub)])
    stop = asyncio.Event()
    started: asyncio.Future[Coordinator] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(args, stop, started), name="test[fleet-serve]")
    coord = await asyncio.wait_for(started, timeout=10)
    store = SqliteStore(tmp_path / "cloud.db")
    await store.open()
    agent = Agent(load_agent_config(cfg_path),
                  uplinks=[LoopbackUplink(IngestService(store), dev)])
    run = asyncio.create_task(agent.run(), name="test[agent]")
    try:
        await asyncio.wait_for(agent.started.wait(), 10)
        spec = tmp_path / "spec.json"
        spec.write_text(json.dumps({"rollout_id": "fw-2.0", "document": document,
                                    "soak_s": 0.3, "plan": {"canary": 1},
                                    "gate": {"min_executed": 1},
                                    "max_notifications_per_min": 60000}))
        assert await asyncio.to_thread(main, ["create-rollout", "--store", db, "--spec",
                                              str(spec), "--broker", f"{host}:{port}",
                                              "--prefix", prefix, "--signing-key",
                                              str(op_key)]) == 0
        for _ in range(500):  # the control message makes the coordinator load it
            if "fw-2.0" in coord.core.rollouts:
                break
            await asyncio.sleep(0.02)
        r = await asyncio.wait_for(coord.wait_finished("fw-2.0"), 20)
        assert r.status == "completed", (r.reason, agent.jobs._done)
        fw = agent.jobs.firmware
        assert fw.counters["downloads_resumed"] == 1 and fw.counters["updated"] == 1
        assert os.readlink(tmp_path / "fw" / "current") == "slot-b"
        assert (tmp_path / "fw" / "slot-b" / "image").read_bytes() == IMAGE
        assert all(agent.stages_alive().values())  # data kept flowing during the update
    finally:
        agent.request_stop()
        await asyncio.wait_for(run, 30)
        stop.set()
        await asyncio.wait_for(task, 10)
        await store.close()
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["status", "--store", db, "--show-devices"]) == 0
    status = json.loads(capsys.readouterr().out)
    (row,) = status["device_progress"]["fw-2.0"]
    assert row["state"] == "succeeded" and row["progress"] == 1.0
    assert row["phase"] == f"health {len(IMAGE)}/{len(IMAGE)}"
