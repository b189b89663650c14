"""Two real ``pymigrate fleet serve`` replicas on PostgreSQL (own schema) and Mosquitto:
one is active (lease + fencing token), the other waits; devices added with the CLI while
they run are known without a restart; ``kill -9`` of the active one mid-wave makes the
standby take over well within 30 s, and the rollout completes with nothing lost and no
device notified twice for the same job attempt. A stale token cannot write."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import pytest

from bench._fleet_harness import FakeFleet, ServeProcess, audit, wait_for
from cloud.fleet.cli import main
from cloud.fleet.states import DeviceState
from cloud.fleet.store import Batch, LeaseLost, open_store
from cloud.fleet.store_pg import PostgresFleetStore
from transports.jobs_security import generate_keypair, load_public_key

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # real processes, ~12 s
S = DeviceState
N = 24


async def _holder(store: PostgresFleetStore) -> tuple[str, int] | None:
    async with store.pool.acquire() as con:
        row = await con.fetchrow(f"SELECT holder, token FROM {store.s}.lease")
    return None if row is None else (str(row[0]), int(row[1]))


async def test_standby_takes_over_after_kill9(mosquitto: tuple[str, int], postgres_dsn: str,
                                              tmp_path: Path) -> None:
    host, port = mosquitto
    prefix = f"pmha-{uuid.uuid4().hex[:8]}"
    schema = f"fleet_ha_{uuid.uuid4().hex[:8]}"
    url = f"{postgres_dsn}?fleet_schema={schema}"
    broker = f"{host}:{port}"
    job_key, job_pub = generate_keypair(tmp_path, "jobs")
    op_key, op_pub = generate_keypair(tmp_path, "operator")
    store = open_store(url)
    assert isinstance(store, PostgresFleetStore) and store.s == schema
    await store.open()
    serve_args = ["--store", url, "--broker", broker, "--prefix", prefix,
                  "--signing-key", str(job_key), "--control-key", str(op_pub)]
    replicas = [ServeProcess(serve_args, tmp_path / f"serve{i}.log") for i in range(2)]
    devices = [f"h{i:02d}" for i in range(N)]
    fleet = FakeFleet(host, port, prefix, devices, verify_key=load_public_key(job_pub),
                      update_s=(0.2, 0.5))
    try:
        for r in replicas:
            await r.start()
        assert await wait_for(lambda: any("coordinator active" in r.log() for r in replicas),
                              20), [r.log() for r in replicas]
        holder = await _holder(store)
        assert holder is not None
        active = next(r for r in replicas if holder[0].endswith(f":{r.pid}"))
        standby = next(r for r in replicas if r is not active)
        await asyncio.sleep(0.3)
        assert "coordinator active" not in standby.log()  # one active at a time

        # registry changes while running: PostgreSQL NOTIFY, no restart, no control message
        (tmp_path / "devices.json").write_text(json.dumps([{"device_id": d} for d in devices]))
        assert await asyncio.to_thread(main, ["add-devices", "--store", url, "--file",
                                              str(tmp_path / "devices.json")]) == 0
        await fleet.start()
        await asyncio.sleep(1.0)
        await fleet.pull()  # an unknown device would be answered "refused"
        await asyncio.sleep(0.5)
        assert fleet.refusals == 0

        spec = tmp_path / "spec.json"
        spec.write_text(json.dumps({
            "rollout_id": "ha", "document": {"content": "v = 3\n"}, "soak_s": 0.3,
            "plan": {"canary": 4, "growth": 2}, "gate": {"min_executed": 4},
            "max_notifications_per_min": 360, "device_timeout_s": 8, "max_retries": 3}))
        assert await asyncio.to_thread(main, [
            "create-rollout", "--store", url, "--spec", str(spec), "--broker", broker,
            "--prefix", prefix, "--signing-key", str(op_key)]) == 0
        assert await wait_for(lambda: fleet.notified >= 8, 30), active.log()
        await active.kill9()
        killed_at = time.monotonic()
        assert fleet.notified < N  # mid-wave

        async def taken_over() -> bool:
            h = await _holder(store)
            return h is not None and h[1] == holder[1] + 1

        assert await wait_for(taken_over, 30)
        failover_s = time.monotonic() - killed_at
        assert failover_s < 30, failover_s
        new = await _holder(store)
        assert new is not None and new[0].endswith(f":{standby.pid}")

        # the old token is fenced off: a write with it is refused, nothing written
        with pytest.raises(LeaseLost):
            await store.commit(Batch(outbox=[]), holder[1])

        async def completed() -> bool:
            recs = {r.rollout_id: r for r in await store.load_rollouts()}
            return "ha" in recs and recs["ha"].status == "completed"

        assert await wait_for(completed, 60), standby.log()
        assert await store.state_counts("ha") == {S.SUCCEEDED: N}
        assert fleet.duplicate_notifications == 0, fleet.deliveries
        assert fleet.bad_signatures == 0
        assert all(fleet.applied[(d, "ha")] == 1 for d in devices)
        lost = await audit(store, "ha", fleet)
        assert lost["broken_chains"] == lost["state_mismatches"] == 0, lost
        assert lost["notified_without_durable_transition"] == 0, lost
        assert await standby.stop() == 0
    finally:
        for r in replicas:
            if r.running:
                await r.kill9()
        await fleet.stop()
        await store.drop_schema()
        await store.close()
