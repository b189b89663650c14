"""``kill -9`` of a real ``pymigrate fleet serve --backend aws-iot-jobs`` process mid-wave,
then a restart, against moto in server mode (``moto.server.ThreadedMotoServer`` on a free
loopback port, in this test process; the serve processes reach it through
``AWS_ENDPOINT_URL``).

The devices are :class:`FakeDevices` from tests/unit/test_fleet_backend_aws.py: they move
the server's execution records (same process, same moto backends) the way the missing
UpdateJobExecution call would. A job created twice would show: moto's CreateJob with an
existing id replaces the job (new ``createdAt``) and re-queues its executions, which the
devices would then answer a second time."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from bench._fleet_harness import ServeProcess, wait_for
from cloud.fleet.cli import main
from cloud.fleet.states import DeviceState
from cloud.fleet.store_sqlite import SqliteFleetStore
from tests.conftest import free_port
from tests.unit.test_fleet_backend_aws import REGION, SPEC, FakeDevices

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # 2 serve processes: 3-11 s
S = DeviceState
N = 40


@pytest.fixture
def moto_server(monkeypatch: pytest.MonkeyPatch) -> Any:
    for mod in ("flask", "flask_cors"):
        pytest.importorskip(mod, reason="moto's server mode needs moto[server]")
    from moto.core.models import DEFAULT_ACCOUNT_ID
    from moto.iot.models import iot_backends
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    for k, v in {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing",
                 "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    import boto3

    client = boto3.client("iot", region_name=REGION, endpoint_url=url)
    try:
        yield client
    finally:
        server.stop()
        iot_backends[DEFAULT_ACCOUNT_ID].reset()


async def test_kill9_mid_wave_then_restart_creates_no_job_twice(
        moto_server: Any, tmp_path: Path) -> None:
    iot = moto_server
    things = [f"k9-{i:03d}" for i in range(N)]
    for t in things:
        iot.create_thing(thingName=t)
    db = str(tmp_path / "fleet.db")
    (tmp_path / "devices.json").write_text(json.dumps([{"device_id": t} for t in things]))
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({**SPEC, "rollout_id": "k9",
                                "document": {"type": "config", "content": "v = 2\n"}}))
    assert await asyncio.to_thread(main, ["add-devices", "--store", db, "--file",
                                          str(tmp_path / "devices.json")]) == 0
    args = ["--backend", "aws-iot-jobs", "--store", db, "--poll-s", "0.05"]
    first = ServeProcess(args, tmp_path / "serve1.log")
    second = ServeProcess(args, tmp_path / "serve2.log")
    devices = FakeDevices(offline=set(things[5:25]))  # wave 1 (5..24) waits for them
    store = SqliteFleetStore(db)
    await store.open()

    async def step_until(pred: Any, within_s: float) -> bool:
        async def check() -> bool:
            devices.step()
            value = pred()
            return bool(await value if asyncio.iscoroutine(value) else value)
        return await wait_for(check, within_s)

    async def record() -> Any:
        return next((r for r in await store.load_rollouts() if r.rollout_id == "k9"), None)

    try:
        await first.start()
        assert await wait_for(lambda: "fleet coordinator active" in first.log(), 20), \
            first.log()
        assert await asyncio.to_thread(main, ["create-rollout", "--store", db, "--spec",
                                              str(spec)]) == 0

        async def wave_1_running() -> bool:
            rec = await record()
            return rec is not None and len(json.loads(rec.waves)) == 2 and any(
                j["jobId"] == "k9-w1" for j in iot.list_jobs()["jobs"])

        assert await step_until(wave_1_running, 30), first.log()
        created = iot.describe_job(jobId="k9-w1")["job"]["createdAt"]
        await first.kill9()
        rec = await record()
        assert rec.status == "running" and rec.backend == "aws-iot-jobs"
        devices.offline = set()  # they come back while no coordinator runs
        devices.step()
        await second.start()

        async def completed() -> bool:
            rec = await record()
            return rec is not None and rec.status == "completed"

        assert await step_until(completed, 60), second.log()
        assert await second.stop() == 0
        assert iot.describe_job(jobId="k9-w1")["job"]["createdAt"] == created
        assert sorted(j["jobId"] for j in iot.list_jobs()["jobs"]) == ["k9-w0", "k9-w1",
                                                                       "k9-w2"]
        assert len(devices.seen) == len(set(devices.seen)) == N  # each device once
        assert await store.state_counts("k9") == {S.SUCCEEDED: N}
        assert "rollout resumed" in second.log()
    finally:
        await first.kill9()
        await second.kill9()
        await store.close()
