"""``kill -9`` of a real ``pymigrate fleet serve`` mid-wave (SQLite store, Mosquitto),
then a restart: no transition lost, no device notified twice for the same job attempt
(counted at fake devices on the broker), and the rollout runs to completion."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest

from bench._fleet_harness import FakeFleet, ServeProcess, audit, wait_for
from cloud.fleet.cli import main
from cloud.fleet.states import DeviceState
from cloud.fleet.store_sqlite import SqliteFleetStore
from transports.jobs_security import generate_keypair, load_public_key

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # real processes, ~12 s
S = DeviceState
N = 30


async def test_kill9_mid_wave_then_restart_loses_nothing(mosquitto: tuple[str, int],
                                                        tmp_path: Path) -> None:
    host, port = mosquitto
    prefix = f"pmk9-{uuid.uuid4().hex[:8]}"
    broker = f"{host}:{port}"
    db = str(tmp_path / "fleet.db")
    job_key, job_pub = generate_keypair(tmp_path, "jobs")
    op_key, op_pub = generate_keypair(tmp_path, "operator")
    devices = [f"k{i:02d}" for i in range(N)]
    (tmp_path / "devices.json").write_text(json.dumps([{"device_id": d} for d in devices]))
    assert await asyncio.to_thread(main, ["add-devices", "--store", db, "--file",
                                          str(tmp_path / "devices.json")]) == 0
    serve_args = ["--store", db, "--broker", broker, "--prefix", prefix,
                  "--signing-key", str(job_key), "--control-key", str(op_pub)]
    fleet = FakeFleet(host, port, prefix, devices, verify_key=load_public_key(job_pub),
                      update_s=(0.2, 0.6))
    await fleet.start()
    first = ServeProcess(serve_args, tmp_path / "serve1.log")
    second = ServeProcess(serve_args, tmp_path / "serve2.log")
    store = SqliteFleetStore(db)
    await store.open()
    try:
        await first.start()
        assert await wait_for(lambda: "fleet coordinator active" in first.log(), 20), first.log()
        spec = tmp_path / "spec.json"  # 6 notifications/s: the waves take a few seconds
        spec.write_text(json.dumps({
            "rollout_id": "k9", "document": {"content": "v = 2\n"}, "soak_s": 0.3,
            "plan": {"canary": 4, "growth": 2}, "gate": {"min_executed": 4},
            "max_notifications_per_min": 360, "device_timeout_s": 8, "max_retries": 3}))
        assert await asyncio.to_thread(main, [
            "create-rollout", "--store", db, "--spec", str(spec), "--broker", broker,
            "--prefix", prefix, "--signing-key", str(op_key)]) == 0
        # mid-wave: some devices heard of the job, far from all of them
        assert await wait_for(lambda: fleet.notified >= 10, 30), first.log()
        await first.kill9()
        heard_before = fleet.notified
        assert heard_before < N
        await asyncio.sleep(0.5)  # devices keep reporting while no coordinator runs
        await second.start()

        async def completed() -> bool:
            recs = {r.rollout_id: r for r in await store.load_rollouts()}
            return "k9" in recs and recs["k9"].status == "completed"

        assert await wait_for(completed, 60), second.log()
        assert await second.stop() == 0
        counts = await store.state_counts("k9")
        assert counts == {S.SUCCEEDED: N}
        assert fleet.duplicate_notifications == 0, fleet.deliveries
        assert fleet.bad_signatures == 0 and fleet.refusals == 0
        assert all(fleet.applied[(d, "k9")] == 1 for d in devices)  # each applied once
        lost = await audit(store, "k9", fleet)
        assert lost["broken_chains"] == lost["state_mismatches"] == 0, lost
        assert lost["notified_without_durable_transition"] == 0, lost
        # progress reported by the devices was stored; status shows it per device
        states = await store.load_device_states("k9")
        assert len(states) == N
    finally:
        for p in (first, second):
            if p.running:
                await p.kill9()
        await fleet.stop()
        await store.close()
