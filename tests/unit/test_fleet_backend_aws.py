"""AWS IoT Jobs backend against moto's IoT mock.

moto implements the control-plane calls used here (CreateJob, DescribeJob,
ListJobExecutionsForJob, CancelJob, CreateThingGroup, AddThingToThingGroup) but not the
device side (the iot-jobs-data API, UpdateJobExecution), and it does not expand a
thing-group target into its members' executions. :class:`FakeDevices` plays the devices:
it moves each execution the way UpdateJobExecution would (QUEUED -> SUCCEEDED or FAILED,
AWS IoT API reference) by writing moto's execution records directly - a small fake of the
missing call, not a mock of the code under test."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto import mock_aws
from moto.core.models import DEFAULT_ACCOUNT_ID
from moto.iot.models import iot_backends

from cloud.fleet.backend_aws import AwsJobsBackend, AwsRollout, job_request
from cloud.fleet.spec import parse_spec
from pymigrate.clock import WallClock

REGION = "eu-west-1"


@pytest.fixture
def iot() -> Iterator[Any]:
    with mock_aws():
        yield boto3.client("iot", region_name=REGION)


class FakeDevices:
    """Answers every queued execution like a device calling UpdateJobExecution; things in
    ``offline`` never answer. Also does what CancelJob does on AWS and moto leaves out:
    the queued executions of a cancelled job become CANCELED (AWS IoT API reference,
    CancelJob with force = false)."""

    def __init__(self, failing: set[str] = frozenset(),  # type: ignore[assignment]
                 offline: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.failing = failing
        self.offline = offline
        self.seen: list[tuple[str, str]] = []

    def step(self) -> None:
        backend = iot_backends[DEFAULT_ACCOUNT_ID][REGION]
        for (job_id, thing), ex in list(backend.job_executions.items()):
            if ex.status != "QUEUED" or job_id not in backend.jobs:  # (a deleted job)
                continue
            if backend.jobs[job_id].status == "CANCELED":
                ex.status = "CANCELED"
            elif thing not in self.offline:
                ex.status = "FAILED" if thing in self.failing else "SUCCEEDED"
                self.seen.append((job_id, thing))


async def drive(rollout: AwsRollout, devices: FakeDevices) -> Any:
    task = asyncio.create_task(rollout.run())
    while not task.done():
        devices.step()
        await asyncio.sleep(0.005)
    return task.result()


def make_things(iot: Any, n: int) -> list[str]:
    names = [f"gw-{i:04d}" for i in range(n)]
    for t in names:
        iot.create_thing(thingName=t)
    return names


SPEC = {"rollout_id": "fw-21", "plan": {"canary": 5, "growth": 4.0},
        "max_notifications_per_min": 600, "device_timeout_s": 900,
        "gate": {"success_threshold": 0.9, "min_executed": 5},
        "document": {"type": "command", "hook": "firmware", "args": {"version": "2.1"}}}


async def test_rollout_runs_one_job_per_wave_with_pacing_abort_and_timeout(iot: Any) -> None:
    things = make_things(iot, 60)
    backend = AwsJobsBackend(iot, account=DEFAULT_ACCOUNT_ID)
    backend.max_direct_targets = 1000  # moto does not expand thing groups into executions
    spec = parse_spec(SPEC)
    res = await drive(AwsRollout(backend, spec, things, clock=WallClock(), poll_s=0.005),
                      FakeDevices())
    assert res.status == "completed" and res.counts == {"SUCCEEDED": 60}
    assert res.jobs == ["fw-21-w0", "fw-21-w1", "fw-21-w2"]  # 5, 20, 35 devices
    assert backend.jobs_created == 3
    job = iot.describe_job(jobId="fw-21-w1")["job"]
    assert job["jobExecutionsRolloutConfig"] == {"maximumPerMinute": 600}
    assert job["timeoutConfig"] == {"inProgressTimeoutInMinutes": 15}
    crit = job["abortConfig"]["criteriaList"]
    assert {c["failureType"] for c in crit} == {"FAILED", "TIMED_OUT"}
    assert all(c["action"] == "CANCEL" and c["thresholdPercentage"] == 10.0
               and c["minNumberOfExecutedThings"] == 10 for c in crit)  # half the wave
    assert len(iot.list_job_executions_for_job(jobId="fw-21-w1")["executionSummaries"]) == 20
    doc = json.loads(iot.get_job_document(jobId="fw-21-w0")["document"])
    assert doc["operation"] == "apply" and doc["document"]["args"] == {"version": "2.1"}


async def test_failing_wave_is_cancelled_and_rolled_back_as_a_new_job(iot: Any) -> None:
    things = make_things(iot, 60)
    backend = AwsJobsBackend(iot, account=DEFAULT_ACCOUNT_ID)
    backend.max_direct_targets = 1000
    failing = set(things[5:25:2])  # half of wave 1 fails
    res = await drive(AwsRollout(backend, parse_spec(SPEC), things, clock=WallClock(),
                                 poll_s=0.005), FakeDevices(failing))
    assert res.status == "aborted" and "fw-21-w1" in res.reason
    assert res.jobs == ["fw-21-w0", "fw-21-w1"]  # wave 2 never created
    assert iot.describe_job(jobId="fw-21-w1")["job"]["status"] in ("CANCELED",
                                                                    "CANCELLATION_IN_PROGRESS")
    assert res.rollback_job == "fw-21-rollback"
    rb = iot.list_job_executions_for_job(jobId="fw-21-rollback")["executionSummaries"]
    rolled = {e["thingArn"].rsplit("/", 1)[-1] for e in rb}
    assert rolled == {t for t in things[:25] if t not in failing}
    assert json.loads(iot.get_job_document(jobId="fw-21-rollback")["document"])[
        "operation"] == "rollback"


async def test_large_wave_targets_a_static_thing_group(iot: Any) -> None:
    things = make_things(iot, 150)
    backend = AwsJobsBackend(iot, account=DEFAULT_ACCOUNT_ID)
    req = await backend.create_job(parse_spec(SPEC), "fw-21-w9", things, {"operation": "apply"})
    (target,) = req["targets"]
    assert target.endswith(":thinggroup/fw-21-w9")
    members = iot.list_things_in_thing_group(thingGroupName="fw-21-w9", maxResults=250)
    assert len(members["things"]) == 150


def test_job_request_clamps_pacing_to_the_aws_range() -> None:
    spec = parse_spec({**SPEC, "max_notifications_per_min": 5000, "device_timeout_s": 10})
    req = job_request(spec, "j", ["arn"], {})
    assert req["jobExecutionsRolloutConfig"] == {"maximumPerMinute": 1000}
    assert req["timeoutConfig"] == {"inProgressTimeoutInMinutes": 1}
    assert req["targetSelection"] == "SNAPSHOT"


async def test_cli_aws_rollout_targets_the_spec_group_from_the_store(
        iot: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from cloud.fleet.cli import main

    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    things = make_things(iot, 12)
    devs = tmp_path / "devices.json"
    devs.write_text(json.dumps([{"device_id": t, "attrs": {"site": "lab" if i % 2 else "x"}}
                                for i, t in enumerate(things)]))
    db = str(tmp_path / "fleet.db")
    assert await asyncio.to_thread(main, ["add-devices", "--store", db, "--file",
                                          str(devs)]) == 0
    assert await asyncio.to_thread(main, ["add-group", "--store", db, "--name", "lab",
                                          "--select", "site=lab"]) == 0
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({**SPEC, "group": "lab",  # (a firmware spec must be signed)
                                "document": {"type": "config", "content": "v = 2\n"}}))
    capsys.readouterr()
    devices = FakeDevices()
    run = asyncio.create_task(asyncio.to_thread(
        main, ["aws-rollout", "--store", db, "--spec", str(spec), "--poll-s", "0.01"]))
    while not run.done():
        devices.step()
        await asyncio.sleep(0.005)
    assert run.result() == 0
    text = capsys.readouterr().out  # unconfigured structlog also writes to stdout here
    out = json.loads(text[text.index("{\n"):])
    assert out["status"] == "completed" and out["aws_jobs_created"] >= 1
    assert {t for _, t in devices.seen} == set(things[1::2])  # only the group's things
