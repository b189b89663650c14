"""``python -m bench fleet --backend aws-iot-jobs --devices N``: the same rollout spec run
through the AWS IoT Jobs backend (``cloud.fleet.backend_aws``) against moto's IoT mock.

moto has the control plane (CreateJob, ListJobExecutionsForJob, CancelJob...) but no
device side (iot-jobs-data UpdateJobExecution) and no time: the simulated devices here
move moto's execution records the way UpdateJobExecution would, on virtual time. Each
job's executions start at its ``maximumPerMinute`` pace (jobExecutionsRolloutConfig), each
device takes 1-5 min (seeded) and fails with the given probability. The coordinator side
(AwsRollout) polls on the same virtual clock, so "simulated minutes" are comparable with
the built-in backend's figure printed beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from typing import Any

from cloud.fleet.spec import RolloutSpec


class _Devices:
    """Simulated things answering executions on virtual time (see module docstring)."""

    def __init__(self, n: int, failure: float, seed: int, rate: int) -> None:
        rng = random.Random(seed)
        self.duration = [rng.uniform(60.0, 300.0) for _ in range(n)]
        self.fails = [rng.random() < failure for _ in range(n)]
        self.rate = rate
        self.start: dict[str, float] = {}  # job id -> virtual time it was first seen

    def step(self, now: float, backend: Any) -> None:
        per_job: dict[str, int] = {}
        for (job_id, thing), ex in backend.job_executions.items():
            if ex.status not in ("QUEUED", "IN_PROGRESS"):
                continue
            t0 = self.start.setdefault(job_id, now)
            k = per_job.get(job_id, 0)
            per_job[job_id] = k + 1
            i = int(thing.rsplit("-", 1)[-1])
            begins = t0 + 60.0 * k / self.rate  # the job's maximumPerMinute pace
            if now >= begins + self.duration[i]:
                ex.status = "FAILED" if self.fails[i] and not job_id.endswith("rollback") \
                    else "SUCCEEDED"
            elif now >= begins:
                ex.status = "IN_PROGRESS"


async def _run(n: int, failure: float, spec: RolloutSpec, seed: int) -> dict[str, Any]:
    import boto3
    from moto import mock_aws
    from moto.core.models import DEFAULT_ACCOUNT_ID
    from moto.iot.models import iot_backends

    from cloud.fleet.backend_aws import AwsJobsBackend, AwsRollout
    from pymigrate.clock import VirtualClock

    region = "us-east-1"
    with mock_aws():
        iot = boto3.client("iot", region_name=region)
        things = [f"thing-{i:06d}" for i in range(n)]
        for t in things:
            iot.create_thing(thingName=t)
        backend = AwsJobsBackend(iot, account=DEFAULT_ACCOUNT_ID)
        backend.max_direct_targets = n  # moto does not expand thing-group targets
        clock = VirtualClock()
        rollout = AwsRollout(backend, spec, things, clock=clock, poll_s=30.0)
        devices = _Devices(n, failure, seed, spec.max_notifications_per_min)
        moto_iot = iot_backends[DEFAULT_ACCOUNT_ID][region]
        t0 = time.perf_counter()
        task = asyncio.create_task(rollout.run())
        while not task.done():
            nxt = clock.next_deadline()
            if nxt is None:  # the rollout is in an AWS call (a thread): let it finish
                await asyncio.sleep(0.001)
                continue
            await clock.advance(nxt - clock.monotonic())
            devices.step(clock.monotonic(), moto_iot)
        res = task.result()
        wall = time.perf_counter() - t0
    return {"status": res.status, "reason": res.reason, "aws_jobs_created":
            backend.jobs_created, "jobs": res.jobs, "rollback_job": res.rollback_job,
            "devices_succeeded": res.counts.get("SUCCEEDED", 0), "executions": res.counts,
            "simulated_minutes": round(clock.monotonic() / 60, 1),
            "wall_seconds": round(wall, 2)}


def run_aws(n: int, failure: float, spec: RolloutSpec, seed: int) -> dict[str, Any]:
    """One rollout of ``n`` devices through the AWS IoT Jobs backend (moto)."""
    import sys

    from pymigrate.logsetup import setup_logging

    setup_logging("console", "warning", stream=sys.stderr)  # stdout carries the JSON
    return asyncio.run(_run(n, failure, spec, seed))


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=["mqtt", "aws-iot-jobs"], default="mqtt",
                   help="aws-iot-jobs: also run the rollout through the AWS IoT Jobs "
                        "backend on moto (needs the [aws] extra and moto)")
