"""A real agent takes a signed config rollout from the real fleet coordinator over
Mosquitto: the new config is applied live with its secret resolved on the device, the
previous one kept, and the rollout completes. Control commands are signed too."""

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
from transports.jobs_security import generate_keypair

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
verify_key = "{verify_key}"
secrets_file = "{secrets}"
{extra}
[log]
level = "warning"
"""


async def test_config_rollout_reaches_a_real_agent(mosquitto: tuple[str, int],
                                                   tmp_path: Path) -> None:
    host, port = mosquitto
    prefix = f"pmjobs-{uuid.uuid4().hex[:8]}"
    dev = f"gw-{uuid.uuid4().hex[:6]}"
    job_key, job_pub = generate_keypair(tmp_path / "keys", "jobs")
    op_key, op_pub = generate_keypair(tmp_path / "keys", "operator")
    secrets = tmp_path / "secrets.toml"
    secrets.write_text('broker_password = "s3cr\\\\et"\n')  # TOML escape
    fmt = {"dev": dev, "data": tmp_path / "var", "host": host, "port": port, "prefix": prefix,
           "verify_key": job_pub, "secrets": secrets}
    cfg_path = tmp_path / "agent.toml"
    cfg_path.write_text(CONFIG.format(profile="unmetered", extra="", **fmt))
    db = str(tmp_path / "fleet.db")
    devs = tmp_path / "devices.json"
    devs.write_text(json.dumps([{"device_id": dev, "attrs": {"site": "lab"}}]))
    assert await asyncio.to_thread(main, ["add-devices", "--store", db, "--file", str(devs)]) == 0
    args = build_parser().parse_args(["serve", "--store", db, "--broker", f"{host}:{port}",
                                      "--prefix", prefix, "--signing-key", str(job_key),
                                      "--control-key", str(op_pub)])
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
        # the job carries a reference, never the password itself
        new_cfg = CONFIG.format(profile="metered", extra='password = "${secret:broker_password}"',
                                **fmt)
        spec = tmp_path / "spec.json"
        spec.write_text(json.dumps({"rollout_id": "r1", "document": {"content": new_cfg},
                                    "soak_s": 0.3, "plan": {"canary": 1},
                                    "gate": {"min_executed": 1},
                                    "max_notifications_per_min": 60000}))
        assert await asyncio.to_thread(main, ["create-rollout", "--store", db, "--spec",
                                              str(spec), "--broker", f"{host}:{port}",
                                              "--prefix", prefix, "--signing-key",
                                              str(op_key)]) == 0
        # the control message makes the running coordinator pick the rollout up
        for _ in range(500):
            if "r1" in coord.core.rollouts:
                break
            await asyncio.sleep(0.02)
        r = await asyncio.wait_for(coord.wait_finished("r1"), timeout=30)
        assert r.status == "completed", (r.reason, agent.jobs._done, agent.jobs.untrusted)
        assert agent.config.retry.profile == "metered"  # applied live, no restart
        assert cfg_path.read_text() == new_cfg.replace("${secret:broker_password}",
                                                       "s3cr\\\\et")
        # resolved from the device's local secrets file (applies at the next restart)
        assert load_agent_config(cfg_path).jobs.password == "s3cr\\et"
        assert agent.jobs.untrusted == {}
        prev = cfg_path.with_name(cfg_path.name + ".prev")
        assert 'profile = "unmetered"' in prev.read_text()  # kept for rollback
    finally:
        agent.request_stop()
        await asyncio.wait_for(run, 30)
        stop.set()
        await asyncio.wait_for(server, 10)
        await store.close()
