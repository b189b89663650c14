"""``pymigrate fleet serve --backend aws-iot-jobs`` (AwsCoordinator) against moto's IoT mock.

Devices are played by :class:`FakeDevices` (see tests/unit/test_fleet_backend_aws.py:
moto has no UpdateJobExecution, the fake moves moto's execution records the way that call
would). Crashes are simulated in-process: :class:`Client` wraps the boto3 client and
raises :class:`Crash` (a BaseException, which nothing in the coordinator catches, like a
kill) right before or after a chosen CreateJob, or the serve task is cancelled while it
waits on a wave. The process state is thrown away and a new coordinator is started on the
same store, as after ``kill -9`` and a restart; what a kill leaves behind is what was
committed, and stopping the crashed coordinator writes nothing more (its stop() only
cancels tasks and gives the lease up). A real ``kill -9`` of a serve process is in
tests/integration/test_fleet_aws_kill9.py."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws
from moto.core.models import DEFAULT_ACCOUNT_ID

from cloud.fleet.backend_aws import AwsJobsBackend
from cloud.fleet.channel import MemoryJobBus
from cloud.fleet.cli import build_parser, main, serve
from cloud.fleet.coordinator import Coordinator
from cloud.fleet.coordinator_aws import AwsCoordinator
from cloud.fleet.registry import Registry
from cloud.fleet.states import DeviceState
from cloud.fleet.store import FleetStore, RolloutRecord
from cloud.fleet.store_sqlite import SqliteFleetStore
from pymigrate.clock import WallClock
from tests.unit.test_fleet_backend_aws import REGION, SPEC, FakeDevices, make_things

S = DeviceState
SPEC_CFG = {**SPEC, "document": {"type": "config", "content": "v = 2\n"}}


class Crash(BaseException):
    """Stands for the process dying at that point."""


class Client:
    """The boto3 IoT client, counting CreateJob per job id, with hooks before / after a
    call (``before[name](kwargs)``) to inject a crash or an AWS error."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.meta = inner.meta
        self.created: Counter[str] = Counter()
        self.before: dict[str, Callable[[dict[str, Any]], None]] = {}
        self.after: dict[str, Callable[[dict[str, Any]], None]] = {}

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self.inner, name)

        def call(**kw: Any) -> Any:
            if name in self.before:
                self.before[name](kw)
            out = fn(**kw)
            if name == "create_job":
                self.created[kw["jobId"]] += 1
            if name in self.after:
                self.after[name](kw)
            return out

        return call


def crash_on(job_id: str) -> Callable[[dict[str, Any]], None]:
    def hook(kw: dict[str, Any]) -> None:
        if kw["jobId"] == job_id:
            raise Crash(f"killed at CreateJob {job_id}")
    return hook


def aws_error(code: str, times: int = 1, job_id: str = "") -> Callable[[dict[str, Any]], None]:
    left = [times]

    def hook(kw: dict[str, Any]) -> None:
        if left[0] > 0 and (not job_id or kw.get("jobId") == job_id):
            left[0] -= 1
            raise ClientError({"Error": {"Code": code, "Message": "injected"}}, "x")
    return hook


@pytest.fixture
def iot() -> Iterator[Any]:
    with mock_aws():
        yield boto3.client("iot", region_name=REGION)


async def seed(store: FleetStore, things: list[str], spec: dict[str, Any]) -> None:
    """Registry rows and a pending rollout, as add-devices and create-rollout write them."""
    reg = Registry()
    await store.save_devices([reg.row(reg.add(t, {})) for t in things])
    await store.save_rollout(RolloutRecord(spec["rollout_id"], json.dumps(spec),
                                           json.dumps(spec.get("plan", {})), "pending",
                                           created_ms=1, updated_ms=1))


async def record(store: FleetStore, rid: str) -> RolloutRecord:
    return next(r for r in await store.load_rollouts() if r.rollout_id == rid)


async def until(pred: Callable[[], bool], devices: FakeDevices) -> None:
    async with asyncio.timeout(30):
        while not pred():
            devices.step()
            await asyncio.sleep(0.005)


class Node:
    """One coordinator process: store + coordinator; ``kill`` drops it like a crash."""

    def __init__(self, db: str, client: Client) -> None:
        self.store = SqliteFleetStore(db)
        self.coord = AwsCoordinator(store=self.store, backend=AwsJobsBackend(
            client, account=DEFAULT_ACCOUNT_ID), poll_s=0.005, clock=WallClock())

    async def start(self) -> Node:
        await self.store.open()
        await self.coord.start()
        return self

    async def kill(self) -> None:
        await self.coord.stop()
        await self.store.close()


async def running(db: str, client: Client, things: list[str],
                  spec: dict[str, Any] = SPEC_CFG) -> Node:
    """A coordinator that started the pending rollout ``spec`` over ``things``."""
    node = await Node(db, client).start()
    await seed(node.store, things, spec)
    await node.coord.load_pending()
    return node


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[str]:
    yield str(tmp_path / "fleet.db")


@pytest.mark.parametrize("when", ["before", "after"])
async def test_restart_after_a_crash_at_create_job_creates_each_job_once(
        iot: Any, db: str, when: str) -> None:
    things = make_things(iot, 60)
    client = Client(iot)
    getattr(client, when)["create_job"] = crash_on("fw-21-w1")
    devices = FakeDevices()
    node = await running(db, client, things)
    await until(node.coord.failed.is_set, devices)
    assert isinstance(node.coord.error, Crash)
    await node.kill()

    store = SqliteFleetStore(db)
    await store.open()
    rec = await record(store, "fw-21")
    waves = json.loads(rec.waves)
    assert rec.status == "running" and rec.backend == "aws-iot-jobs"
    # the job id was stored before CreateJob: present whether or not the job was created
    assert [w["job_id"] for w in waves] == ["fw-21-w0", "fw-21-w1"]
    assert waves[0]["gate"] == "passed" and waves[0]["counts"] == {"SUCCEEDED": 5}
    exists = "fw-21-w1" in {j["jobId"] for j in iot.list_jobs()["jobs"]}
    assert exists == (when == "after")
    await store.close()

    client.before.clear()
    client.after.clear()
    node = await Node(db, client).start()
    await node.coord.load_pending()
    await until(lambda: "fw-21" in node.coord.results, devices)
    res = node.coord.results["fw-21"]
    assert res.status == "completed" and res.counts == {"SUCCEEDED": 60}
    assert client.created == {"fw-21-w0": 1, "fw-21-w1": 1, "fw-21-w2": 1}
    assert len(devices.seen) == len(set(devices.seen)) == 60  # nobody got a job twice
    rec = await record(node.store, "fw-21")
    assert rec.status == "completed" and rec.finished_ms > 0
    assert await node.store.state_counts("fw-21") == {S.SUCCEEDED: 60}
    await node.kill()


async def test_crash_while_rolling_back_resumes_the_rollback_once(iot: Any, db: str) -> None:
    things = make_things(iot, 60)
    failing = set(things[5:25:2])  # half of wave 1 fails: gate, cancel, rollback
    client = Client(iot)
    client.before["create_job"] = crash_on("fw-21-rollback")
    devices = FakeDevices(failing)
    node = await running(db, client, things)
    await until(node.coord.failed.is_set, devices)
    await node.kill()

    client.before.clear()
    node = await Node(db, client).start()
    rec = await record(node.store, "fw-21")
    assert rec.status == "rolling_back" and "wave gate" in rec.reason
    assert json.loads(rec.backend_state)["rollback_job"] == "fw-21-rollback"
    await node.coord.load_pending()
    await until(lambda: "fw-21" in node.coord.results, devices)
    res = node.coord.results["fw-21"]
    assert res.status == "aborted" and res.rollback_job == "fw-21-rollback"
    assert client.created == {"fw-21-w0": 1, "fw-21-w1": 1, "fw-21-rollback": 1}
    assert iot.describe_job(jobId="fw-21-w1")["job"]["reasonCode"] == "pymigrate_gate"
    assert len(devices.seen) == len(set(devices.seen))
    ok = [t for t in things[:25] if t not in failing]
    rolled = {t for j, t in devices.seen if j == "fw-21-rollback"}
    assert rolled == set(ok)
    counts = await node.store.state_counts("fw-21")
    assert counts == {S.ROLLED_BACK: len(ok), S.FAILED: len(failing), S.QUEUED: 35}
    rec = await record(node.store, "fw-21")
    assert rec.status == "aborted" and rec.finished_ms > 0
    assert json.loads(rec.backend_state)["rollback_counts"] == {"SUCCEEDED": len(ok)}
    await node.kill()


def serve_args(db: str, *extra: str) -> Any:
    return build_parser().parse_args(["serve", "--store", db, "--backend", "aws-iot-jobs",
                                      "--region", REGION, "--poll-s", "0.005", *extra])


def out_json(capsys: pytest.CaptureFixture[str]) -> Any:
    """The command's JSON (unconfigured structlog also writes to stdout in tests)."""
    text = capsys.readouterr().out
    return json.loads(text[text.index("{\n"):])


async def cli(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


async def registered(iot: Any, tmp_path: Path, n: int, **spec: Any
                     ) -> tuple[list[str], str, str]:
    """``n`` things in moto, registered in a SQLite store by add-devices, and a spec file:
    (things, store path, spec path)."""
    things = make_things(iot, n)
    db = str(tmp_path / "fleet.db")
    devs = tmp_path / "devices.json"
    devs.write_text(json.dumps([{"device_id": t} for t in things]))
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({**SPEC_CFG, **spec}))
    assert await cli("add-devices", "--store", db, "--file", str(devs)) == 0
    return things, db, str(path)


class Serve:
    """``serve(args)`` as a task, like the process."""

    def __init__(self, args: Any) -> None:
        self.stop = asyncio.Event()
        self.started: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.task = asyncio.create_task(serve(args, self.stop, self.started),
                                        name="test[serve-aws]")

    async def coord(self) -> AwsCoordinator:
        c = await asyncio.wait_for(self.started, 10)
        assert isinstance(c, AwsCoordinator)
        return c

    async def close(self) -> int:
        self.stop.set()
        return await asyncio.wait_for(self.task, 10)


async def test_serve_picks_up_created_rollouts_survives_a_kill_and_status_shows_it(
        iot: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    things, db, spec = await registered(iot, tmp_path, 60)
    devices = FakeDevices(offline=set(things[5:25]))  # wave 1 waits for them
    server = Serve(serve_args(db))
    await server.coord()
    assert await cli("create-rollout", "--store", db, "--spec", spec) == 0  # while running
    store = SqliteFleetStore(db)
    await store.open()

    async def wave_1_open() -> bool:
        waves = json.loads((await record(store, "fw-21")).waves)
        return len(waves) == 2

    async with asyncio.timeout(20):
        while not await wave_1_open():
            devices.step()
            await asyncio.sleep(0.01)
    server.task.cancel()  # "kill": the task dies mid-wave (its stop() writes nothing)
    with pytest.raises(asyncio.CancelledError):
        await server.task
    await store.close()

    devices.offline = set()
    server = Serve(serve_args(db))
    coord = await server.coord()
    await until(lambda: "fw-21" in coord.results, devices)
    assert await server.close() == 0
    assert dict(iot_created(iot)) == {"fw-21-w0": 5, "fw-21-w1": 20, "fw-21-w2": 35}
    assert len(devices.seen) == len(set(devices.seen)) == 60

    capsys.readouterr()
    assert await cli("status", "--store", db) == 0
    out = out_json(capsys)
    (ro,) = out["rollouts"]
    assert ro["status"] == "completed" and ro["backend"] == "aws-iot-jobs"
    assert ro["states"] == {"succeeded": 60} and ro["success_rate"] == 1.0
    assert [w["job_id"] for w in ro["waves"]] == ["fw-21-w0", "fw-21-w1", "fw-21-w2"]
    assert [w["executions"] for w in ro["waves"]] == [{"SUCCEEDED": n} for n in (5, 20, 35)]
    assert [w["states"] for w in ro["waves"]] == [{"succeeded": n} for n in (5, 20, 35)]


def iot_created(iot: Any) -> Counter[str]:
    """Executions per job in moto (a job created twice would still show once: see the
    Client counter for that)."""
    out: Counter[str] = Counter()
    for j in iot.list_jobs()["jobs"]:
        out[j["jobId"]] = len(iot.list_job_executions_for_job(
            jobId=j["jobId"])["executionSummaries"])
    return out


@pytest.mark.parametrize("cmd", ["abort", "cancel"])
async def test_abort_and_cancel_reach_serve_through_the_current_job(
        iot: Any, tmp_path: Path, cmd: str, capsys: pytest.CaptureFixture[str]) -> None:
    things, db, spec = await registered(iot, tmp_path, 60)
    assert await cli("create-rollout", "--store", db, "--spec", spec) == 0
    devices = FakeDevices(offline=set(things[10:25]))  # wave 1 stays open
    server = Serve(serve_args(db))
    coord = await server.coord()
    await until(lambda: iot_created(iot).get("fw-21-w1", 0) > 0
                and sum(1 for j, _ in devices.seen if j == "fw-21-w1") == 5, devices)
    capsys.readouterr()
    control = [cmd, "--backend", "aws-iot-jobs", "--store", db, "--region", REGION,
               "--rollout", "fw-21"]
    assert await cli(*control) == 0
    sent = out_json(capsys)
    assert sent["cancelled_job"] == "fw-21-w1"
    await until(lambda: "fw-21" in coord.results, devices)
    assert await server.close() == 0
    res = coord.results["fw-21"]
    job = iot.describe_job(jobId="fw-21-w1")["job"]
    assert job["status"] == "CANCELED" and job["reasonCode"] == f"pymigrate_{cmd}"
    store = SqliteFleetStore(db)
    await store.open()
    counts = await store.state_counts("fw-21")
    await store.close()
    if cmd == "abort":
        assert res.status == "aborted" and res.reason == "operator_abort"
        assert res.rollback_job == "fw-21-rollback"
        rolled = {t for j, t in devices.seen if j == "fw-21-rollback"}
        assert rolled == set(things[:10])  # the ones that had succeeded
        assert counts == {S.ROLLED_BACK: 10, S.SKIPPED: 15, S.QUEUED: 35}
    else:
        assert res.status == "cancelled" and res.rollback_job == ""
        assert counts == {S.SUCCEEDED: 10, S.SKIPPED: 15, S.QUEUED: 35}
    capsys.readouterr()
    assert await cli(*control) == 0  # a finished rollout: says so, changes nothing
    assert out_json(capsys)["status"] == res.status


async def test_control_commands_on_the_aws_backend(
        iot: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, db, spec = await registered(iot, tmp_path, 6)
    assert await cli("create-rollout", "--store", db, "--spec", spec) == 0
    aws = ["--backend", "aws-iot-jobs", "--store", db, "--region", REGION, "--rollout"]
    capsys.readouterr()
    assert await cli("pause", *aws, "fw-21") == 2
    assert "not available on the aws-iot-jobs backend" in capsys.readouterr().err
    assert await cli("abort", "--rollout", "fw-21") == 2  # mqtt needs --broker
    assert "--broker" in capsys.readouterr().err
    assert await cli("abort", *aws, "nope") == 1
    assert "unknown rollout" in capsys.readouterr().err
    # a rollout not started yet is cancelled in the store: serve never starts it
    assert await cli("cancel", *aws, "fw-21") == 0
    assert out_json(capsys)["was"] == "pending"
    server = Serve(serve_args(db))
    coord = await server.coord()
    assert await server.close() == 0
    assert coord.rollouts == {} and iot.list_jobs()["jobs"] == []
    assert await cli("status", "--store", db) == 0
    (ro,) = out_json(capsys)["rollouts"]
    assert ro["status"] == "cancelled" and ro["reason"] == "operator_cancel"


async def test_abort_while_no_coordinator_runs_is_applied_on_resume(
        iot: Any, db: str, capsys: pytest.CaptureFixture[str]) -> None:
    things = make_things(iot, 60)
    client = Client(iot)
    devices = FakeDevices(offline=set(things[10:25]))
    node = await running(db, client, things)
    await until(lambda: sum(1 for j, _ in devices.seen if j == "fw-21-w1") == 5, devices)
    await node.kill()
    capsys.readouterr()
    assert await cli("abort", "--backend", "aws-iot-jobs", "--store", db, "--region", REGION,
                     "--rollout", "fw-21") == 0
    assert out_json(capsys)["cancelled_job"] == "fw-21-w1"
    node = await Node(db, client).start()
    await node.coord.load_pending()
    await until(lambda: "fw-21" in node.coord.results, devices)
    res = node.coord.results["fw-21"]
    assert res.status == "aborted" and res.reason == "operator_abort"
    assert client.created == {"fw-21-w0": 1, "fw-21-w1": 1, "fw-21-rollback": 1}
    await node.kill()


async def test_aws_errors_retry_when_transient_and_roll_back_when_not(
        iot: Any, db: str) -> None:
    things = make_things(iot, 60)
    client = Client(iot)
    client.before["list_job_executions_for_job"] = aws_error("ThrottlingException", 3)
    client.before["create_job"] = aws_error("InvalidRequestException", job_id="fw-21-w2")
    devices = FakeDevices()
    node = await running(db, client, things)
    await until(lambda: "fw-21" in node.coord.results, devices)
    res = node.coord.results["fw-21"]
    assert res.status == "aborted" and "InvalidRequestException" in res.reason
    assert res.rollback_job == "fw-21-rollback"  # waves 0 and 1 had succeeded
    assert {t for j, t in devices.seen if j == "fw-21-rollback"} == set(things[:25])
    assert not node.coord.failed.is_set()
    await node.kill()


async def test_offline_devices_do_not_hold_a_wave_and_empty_groups_end_at_once(
        iot: Any, db: str) -> None:
    things = make_things(iot, 30)
    offline = {things[1], things[7]}
    devices = FakeDevices(offline=offline)
    node = await Node(db, Client(iot)).start()
    await seed(node.store, things, {**SPEC_CFG, "offline_wait_s": 0.3,
                                    "gate": {"success_threshold": 0.9, "min_executed": 2}})
    await seed(node.store, [], {**SPEC_CFG, "rollout_id": "none", "group": "nosuch"})
    await node.coord.load_pending()
    await until(lambda: {"fw-21", "none"} <= set(node.coord.results), devices)
    assert node.coord.results["fw-21"].status == "completed"
    assert await node.store.state_counts("fw-21") == {S.SUCCEEDED: 28, S.QUEUED: 2}
    rec = await record(node.store, "none")
    assert rec.status == "cancelled" and "nosuch" in rec.reason
    await node.kill()


async def test_a_standby_waits_for_the_lease_and_the_mqtt_coordinator_leaves_aws_rollouts(
        iot: Any, db: str) -> None:
    things = make_things(iot, 6)
    node = await running(db, Client(iot), things)
    devices = FakeDevices()
    await until(lambda: "fw-21" in node.coord.results, devices)
    other = AwsCoordinator(store=SqliteFleetStore(db), backend=AwsJobsBackend(iot))
    await other.store.open()
    with pytest.raises(Exception, match="another coordinator"):
        await other.start()  # SQLite: single node, refused while the lease is held
    await other.store.close()
    await node.kill()
    store = SqliteFleetStore(db)
    await store.open()
    mqtt = Coordinator(store=store, channel=MemoryJobBus(), clock=WallClock())
    await mqtt.start()
    assert mqtt.core.rollouts == {}  # the AWS rollout is not the built-in engine's
    await mqtt.stop()
    await store.close()


async def test_aws_rollout_command_continues_a_stored_rollout(
        iot: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, db, spec = await registered(iot, tmp_path, 12)
    client = Client(iot)
    # a first run dies at wave 1; running the command again finishes the rollout
    node = await Node(db, client).start()
    await node.store.save_rollout(RolloutRecord("fw-21", json.dumps(SPEC_CFG), "{}",
                                                "pending", created_ms=1, updated_ms=1))
    client.before["create_job"] = crash_on("fw-21-w1")
    devices = FakeDevices()
    await node.coord.load_pending()
    await until(node.coord.failed.is_set, devices)
    await node.kill()
    capsys.readouterr()
    run = asyncio.create_task(cli("aws-rollout", "--store", db, "--spec", spec,
                                  "--region", REGION, "--poll-s", "0.005"))
    await until(run.done, devices)
    assert run.result() == 0
    out = out_json(capsys)
    assert out["status"] == "completed" and out["counts"] == {"SUCCEEDED": 12}
    assert out["jobs"] == ["fw-21-w0", "fw-21-w1"] and out["aws_jobs_created"] == 1
    assert await cli("aws-rollout", "--store", db, "--spec", spec, "--region", REGION) == 1
    assert "give the spec a new rollout_id" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["console", "deleted"])
async def test_a_wave_job_stopped_outside_pymigrate_aborts_the_rollout(
        iot: Any, db: str, how: str) -> None:
    things = make_things(iot, 30)
    client = Client(iot)
    devices = FakeDevices(offline=set(things[5:25]))
    node = await running(db, client, things)
    await until(lambda: client.created["fw-21-w1"] == 1, devices)
    if how == "console":
        iot.cancel_job(jobId="fw-21-w1", reasonCode="ops", comment="bad build")
    else:
        iot.delete_job(jobId="fw-21-w1", force=True)
    await until(lambda: "fw-21" in node.coord.results, devices)
    res = node.coord.results["fw-21"]
    assert res.status == "aborted" and res.rollback_job == "fw-21-rollback"
    assert res.reason == ("job fw-21-w1 was cancelled in AWS IoT (ops: bad build)"
                          if how == "console" else "job fw-21-w1 no longer exists in AWS IoT")
    await node.kill()


async def test_a_failed_rollback_ends_the_rollout_aborted_with_the_reason(
        iot: Any, db: str) -> None:
    things = make_things(iot, 30)
    client = Client(iot)
    client.before["create_job"] = aws_error("LimitExceededException", job_id="fw-21-rollback")
    client.before["list_job_executions_for_job"] = lambda kw: _connection_lost(kw)
    devices = FakeDevices(failing=set(things[5:25]))
    node = await running(db, client, things)
    await until(lambda: "fw-21" in node.coord.results, devices)
    res = node.coord.results["fw-21"]
    assert res.status == "aborted" and res.rollback_job == "fw-21-rollback"
    assert "wave gate" in res.reason and "rollback failed" in res.reason
    assert "LimitExceededException" in res.reason
    assert _LOST == [1]  # the lost connection was retried, not fatal
    await node.kill()


_LOST: list[int] = []


def _connection_lost(kw: dict[str, Any]) -> None:
    if not _LOST:
        from botocore.exceptions import EndpointConnectionError

        _LOST.append(1)
        raise EndpointConnectionError(endpoint_url="https://iot.example")


def test_records_and_aws_configuration_errors() -> None:
    from cloud.fleet.backend_aws import AwsJobsError
    from cloud.fleet.coordinator_aws import result_of

    rec = RolloutRecord("r", "{}", "{}", "completed", waves=json.dumps([
        {"index": 0, "start": 0, "end": 2, "job_id": "r-w0", "counts": {"SUCCEEDED": 2}},
        {"index": 1, "start": 2, "end": 5, "job_id": "r-w1",
         "counts": {"SUCCEEDED": 2, "FAILED": 1}}]),
        backend="aws-iot-jobs", backend_state=json.dumps({"rollback_job": "r-rollback"}))
    res = result_of(rec)
    assert res.jobs == ["r-w0", "r-w1"] and res.counts == {"SUCCEEDED": 4, "FAILED": 1}
    assert res.rollback_job == "r-rollback"
    with pytest.raises(AwsJobsError, match="AWS configuration") as err:
        AwsJobsBackend.from_environment(region=REGION, profile="no-such-profile-here")
    assert err.value.reason == "aws_config"


async def test_cli_aws_edges(iot: Any, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    _, db, spec = await registered(iot, tmp_path, 6, group="empty")
    assert await cli("add-group", "--store", db, "--name", "empty", "--members", "nobody") == 0
    capsys.readouterr()
    assert await cli("aws-rollout", "--store", db, "--spec", spec, "--region", REGION) == 2
    assert "has no devices" in capsys.readouterr().err
    store = SqliteFleetStore(db)
    await store.open()
    await store.save_rollout(RolloutRecord("mq", "{}", "{}", "running"))  # built-in's
    await store.close()
    aws = ["--backend", "aws-iot-jobs", "--store", db, "--region", REGION, "--rollout"]
    assert await cli("abort", *aws, "mq") == 1
    assert "built-in MQTT backend" in capsys.readouterr().err
