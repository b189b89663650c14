"""The AWS IoT Jobs coordinator on PostgreSQL (own schema), moto's IoT mock in-process:
a rollout stored by ``fleet create-rollout`` is started on the NOTIFY (the coordinator's
poll is an hour, so nothing else could start it), a standby waits for the lease, and when
the active one's lease session dies the standby takes over and finishes the rollout
without creating a job twice; the old one stops with LeaseLost."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from cloud.fleet.backend_aws import AwsJobsBackend
from cloud.fleet.cli import main
from cloud.fleet.coordinator_aws import AwsCoordinator
from cloud.fleet.store import LeaseLost
from cloud.fleet.store_pg import PostgresFleetStore
from pymigrate.clock import WallClock
from tests.unit.test_fleet_backend_aws import SPEC, FakeDevices, make_things
from tests.unit.test_fleet_serve_aws import Client, iot  # noqa: F401 - the moto fixture

pytestmark = pytest.mark.integration


async def test_notify_pickup_standby_takeover_and_lease_loss(
        iot: Any, postgres_dsn: str, tmp_path: Path) -> None:  # noqa: F811
    schema = f"fleet_aws_{uuid.uuid4().hex[:8]}"
    url = f"{postgres_dsn}?fleet_schema={schema}"
    things = make_things(iot, 30)
    (tmp_path / "devices.json").write_text(json.dumps([{"device_id": t} for t in things]))
    (tmp_path / "spec.json").write_text(json.dumps(
        {**SPEC, "document": {"type": "config", "content": "v = 2\n"}}))
    assert await asyncio.to_thread(main, ["add-devices", "--store", url, "--file",
                                          str(tmp_path / "devices.json")]) == 0
    client = Client(iot)
    stores = [PostgresFleetStore(postgres_dsn, schema=schema) for _ in range(2)]
    coords = [AwsCoordinator(store=s, backend=AwsJobsBackend(client, account="123456789012"),
                             clock=WallClock(), poll_s=p, holder=f"replica-{i}")
              for i, (s, p) in enumerate(zip(stores, (3600.0, 0.005)))]
    devices = FakeDevices(offline=set(things[5:25]))
    standby: asyncio.Task[None] | None = None
    try:
        for s in stores:
            await s.open()
        await coords[0].start()
        standby = asyncio.create_task(coords[1].start(), name="test[standby]")
        assert await asyncio.to_thread(main, ["create-rollout", "--store", url, "--spec",
                                              str(tmp_path / "spec.json")]) == 0
        async with asyncio.timeout(20):  # started on the NOTIFY, wave 0 created
            while client.created["fw-21-w0"] == 0:
                devices.step()
                await asyncio.sleep(0.01)
        assert not standby.done()  # waiting for the lease
        stores[0]._lease_con.terminate()  # the active replica's session dies
        async with asyncio.timeout(20):
            await standby
            await coords[0].failed.wait()
        assert isinstance(coords[0].error, LeaseLost)
        assert coords[1].token == coords[0].token + 1
        await coords[1].load_pending()
        async with asyncio.timeout(30):
            devices.offline = set()
            while "fw-21" not in coords[1].results:
                devices.step()
                await asyncio.sleep(0.005)
        assert coords[1].results["fw-21"].status == "completed"
        assert client.created == {"fw-21-w0": 1, "fw-21-w1": 1, "fw-21-w2": 1}
        assert len(devices.seen) == len(set(devices.seen)) == 30
        rec = next(r for r in await stores[1].load_rollouts() if r.rollout_id == "fw-21")
        assert rec.status == "completed" and rec.backend == "aws-iot-jobs"
    finally:
        if standby is not None and not standby.done():
            standby.cancel()
        for c in coords:
            await c.stop()
        await stores[1].drop_schema()
        for s in stores:
            await s.close()
