"""``pymigrate fleet serve`` on the local Mosquitto, driven by the CLI's own commands."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest

from agent.jobs import JobsClient
from cloud.fleet.cli import build_parser, main, serve
from cloud.fleet.coordinator import Coordinator
from cloud.fleet.protocol import Health
from pymigrate.clock import WallClock
from transports.jobs_mqtt import MqttDeviceHub
from transports.jobs_security import generate_keypair, load_public_key

pytestmark = pytest.mark.integration


async def test_serve_create_and_control_over_mqtt(mosquitto: tuple[str, int],
                                                  tmp_path: Path) -> None:
    host, port = mosquitto
    prefix = f"pmcli-{uuid.uuid4().hex[:8]}"
    broker = f"{host}:{port}"
    db = str(tmp_path / "fleet.db")
    devs = tmp_path / "devices.json"
    devs.write_text(json.dumps([{"device_id": f"c{i}", "attrs": {"site": "a"}}
                                for i in range(6)]))
    assert await asyncio.to_thread(main, ["add-devices", "--store", db, "--file", str(devs)]) == 0
    job_key, job_pub = generate_keypair(tmp_path, "jobs")
    op_key, op_pub = generate_keypair(tmp_path, "operator")
    signed = ["--signing-key", str(op_key)]
    args = build_parser().parse_args(["serve", "--store", db, "--broker", broker,
                                      "--prefix", prefix, "--signing-key", str(job_key),
                                      "--control-key", str(op_pub)])
    stop = asyncio.Event()
    started: asyncio.Future[Coordinator] = asyncio.get_running_loop().create_future()
    server = asyncio.create_task(serve(args, stop, started), name="test[serve]")
    coord = await asyncio.wait_for(started, timeout=10)
    hub = MqttDeviceHub(host, port, prefix=prefix, client_id=f"{prefix}-hub",
                        will_device="c0")
    await hub.start()
    clients = []
    for i in range(6):
        cfg = tmp_path / f"c{i}.toml"
        cfg.write_text("a = 1\n")
        c = JobsClient(f"c{i}", channel=hub.link(f"c{i}"), apply_config=lambda p: None,
                       health=lambda: Health(), clock=WallClock(), config_path=cfg,
                       check_delay_s=0.01, health_interval_s=0.05, soak_reports=1,
                       verify_key=load_public_key(job_pub))
        await c.start()
        clients.append(c)
    try:
        spec = tmp_path / "spec.json"
        spec.write_text(json.dumps({"rollout_id": "cli-1", "document": {"content": "a = 2\n"},
                                    "soak_s": 0.2, "plan": {"canary": 2},
                                    "gate": {"min_executed": 2},
                                    "max_notifications_per_min": 60000}))
        assert await asyncio.to_thread(main, ["create-rollout", "--store", db, "--spec",
                                              str(spec), "--broker", broker,
                                              "--prefix", prefix, *signed]) == 0
        # the control message makes the running coordinator pick the rollout up
        for _ in range(200):
            if "cli-1" in coord.core.rollouts:
                break
            await asyncio.sleep(0.02)
        r = await asyncio.wait_for(coord.wait_finished("cli-1"), timeout=20)
        assert r.status == "completed" and r.counts[4] == 6
        assert all((tmp_path / f"c{i}.toml").read_text() == "a = 2\n" for i in range(6))
        assert all(c.untrusted == {} and c.applied == 1 for c in clients)
        before = coord.rejected
        assert await asyncio.to_thread(main, ["pause", "--broker", broker, "--prefix", prefix,
                                              "--rollout", "nope", *signed]) == 0
        for _ in range(200):
            if coord.rejected > before:
                break
            await asyncio.sleep(0.02)
        assert coord.rejected == before + 1  # unknown rollout: refused, counted
        # an unsigned abort (anyone the broker lets publish) is refused: nothing rolls back
        assert await asyncio.to_thread(main, ["abort", "--broker", broker, "--prefix", prefix,
                                              "--rollout", "cli-1"]) == 0
        for _ in range(200):
            if coord.rejected > before + 1:
                break
            await asyncio.sleep(0.02)
        assert coord.rejected == before + 2 and r.status == "completed"
        await coord.flush()
        assert await asyncio.to_thread(main, ["status", "--store", db]) == 0
    finally:
        for c in clients:
            await c.stop()
        await hub.stop()
        stop.set()
        assert await asyncio.wait_for(server, timeout=10) == 0
