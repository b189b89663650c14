"""A real agent takes a config rollout from the real fleet coordinator over Mosquitto:
the new config is applied live, the previous one kept, and the rollout completes."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest

from agent.config import load_agent_config
from agent.supervisor import Agent
from cloud.fleet.cli import build_parser, main, serve
from cloud.fleet.coordinator import Coordinator
from cloud.ingest import IngestService
from cloud.stores import SqliteStore
from tests.support.loopback import LoopbackUplink

pytestmark = pytest.mark.integration

CONFIG = """
[device]
id = "{dev}"
data_dir = "{data}"

[[sources]]
type = "weather"
sensors = 2
interval_s = 0.05

[retry]
profile = "{profile}"

[jobs]
enabled = true
host = "{host}"
port = {port}
prefix = "{prefix}"
check_delay_s = 0.05
health_interval_s = 0.05
heartbeat_s = 0

[log]
level = "warning"
"""


async def test_config_rollout_reaches_a_real_agent(mosquitto: tuple[str, int],
                                                   tmp_path: Path) -> None:
    host, port = mosquitto
    prefix = f"pmjobs-{uuid.uuid4().hex[:8]}"
    dev = f"gw-{uuid.uuid4().hex[:6]}"
    fmt = {"dev": dev, "data": tmp_path / "var", "host": host, "port": port, "prefix": prefix}
    cfg_path = tmp_path / "agent.toml"
    cfg_path.write_text(CONFIG.format(profile="unmetered", **fmt))
    db = str(tmp_path / "fleet.db")
    devs = tmp_path / "devices.json"
    devs.write_text(json.dumps([{"device_id": dev, "attrs": {"site": "lab"}}]))
    assert await asyncio.to_thread(main, ["add-devices", "--store", db, "--file", str(devs)]) == 0
    args = build_parser().parse_args(["serve", "--store", db, "--broker", f"{host}:{port}",
                                      "--prefix", prefix])
    stop = asyncio.Event()
    started: asyncio.Future[Coordinator] = asyncio.get_running_loop().create_future()
    server = asyncio.create_task(serve(args, stop, started), name="test[fleet-serve]")
    coord = await asyncio.wait_for(started, timeout=10)

    store = SqliteStore(tmp_path / "cloud.db")
    await store.open()
    agent = Agent(load_agent_config(cfg_path),
                  uplinks=[LoopbackUplink(IngestService(store), dev)])
    run = asyncio.create_task(agent.run(), name="test[agent]")
    try:
        await asyncio.wait_for(agent.started.wait(), 10)
        for _ in range(200):
            if agent.jobs is not None:
                break
            await asyncio.sleep(0.02)
        new_cfg = CONFIG.format(profile="metered", **fmt)
        spec = tmp_path / "spec.json"
        spec.write_text(json.dumps({"rollout_id": "r1", "document": {"content": new_cfg},
                                    "soak_s": 0.3, "plan": {"canary": 1},
                                    "gate": {"min_executed": 1},
                                    "max_notifications_per_min": 60000}))
        assert await asyncio.to_thread(main, ["create-rollout", "--store", db, "--spec",
                                              str(spec), "--broker", f"{host}:{port}",
                                              "--prefix", prefix]) == 0
        # the control message makes the running coordinator pick the rollout up
        for _ in range(500):
            if "r1" in coord.core.rollouts:
                break
            await asyncio.sleep(0.02)
        r = await asyncio.wait_for(coord.wait_finished("r1"), timeout=30)
        assert r.status == "completed"
        assert agent.config.retry.profile == "metered"  # applied live, no restart
        assert cfg_path.read_text() == new_cfg
        prev = cfg_path.with_name(cfg_path.name + ".prev")
        assert 'profile = "unmetered"' in prev.read_text()  # kept for rollback
    finally:
        agent.request_stop()
        await asyncio.wait_for(run, 30)
        stop.set()
        await asyncio.wait_for(server, 10)
        await store.close()
