"""``pymigrate fleet`` commands on the AWS IoT Jobs backend: the ``serve --backend
aws-iot-jobs`` service, the one-shot ``aws-rollout`` and ``abort`` / ``cancel`` of a
rollout running there.

Operator commands reach a running AWS coordinator through AWS itself: ``abort`` and
``cancel`` call CancelJob on the rollout's current job (reason code ``pymigrate_abort`` /
``pymigrate_cancel``); the coordinator sees the cancelled job on its next read and rolls
back (abort) or stops (cancel). This also works while no coordinator runs: the next one
finds the job cancelled when it resumes.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import msgspec

from cloud.fleet.backend_aws import (
    ABORT_CODE,
    CANCEL_CODE,
    CANCELLED,
    FINAL,
    JOB_STOPPED,
    ROLLING_BACK,
    AwsJobsBackend,
    AwsJobsError,
)
from cloud.fleet.coordinator_aws import BACKEND, PENDING, AwsCoordinator, progress_of
from cloud.fleet.registry import Registry
from cloud.fleet.spec import RolloutSpec
from cloud.fleet.states import FleetError, UnknownRollout
from cloud.fleet.store import FleetStore, LeaseHeld, RolloutRecord, open_store
from pymigrate.errors import ConfigError

_ENC = msgspec.json.Encoder()
LEASE_WAIT_S = 15.0  # aws-rollout: how long to wait for a store another coordinator holds
CONTROL_TRIES = 30  # abort / cancel: reads of the store while a wave hands over to the next
CONTROL_PAUSE_S = 1.0


def backend_of(args: argparse.Namespace) -> AwsJobsBackend:
    """The AWS IoT client from --region / --profile and the usual AWS chain."""
    return AwsJobsBackend.from_environment(region=args.region, profile=args.profile)


def aws_coordinator(args: argparse.Namespace, store: FleetStore) -> AwsCoordinator:
    """``serve --backend aws-iot-jobs``."""
    return AwsCoordinator(store=store, backend=backend_of(args), poll_s=args.poll_s)


async def _targets(store: FleetStore, spec: RolloutSpec) -> list[str]:
    reg = Registry()
    reg.load_rows(await store.load_devices())
    for g in await store.load_groups():
        reg.add_group(g)
    return [reg.ids[i] for i in reg.resolve(spec.group)]


async def aws_rollout(args: argparse.Namespace, spec: RolloutSpec) -> dict[str, Any]:
    """Run one rollout in the foreground with the same persistence as ``serve``: stored,
    run under the store's lease, and continued by running the command again (or by
    ``serve --backend aws-iot-jobs``) after a crash."""
    store = open_store(args.store)
    await store.open()
    try:
        targets = await _targets(store, spec)
        if not targets:
            raise ConfigError("rollout.group", f"group {spec.group!r} has no devices in "
                              f"{args.store}")
        backend = backend_of(args)
        coord = AwsCoordinator(store=store, backend=backend, poll_s=args.poll_s)
        try:
            await asyncio.wait_for(coord.start(scan=False), LEASE_WAIT_S)
        except TimeoutError:
            raise LeaseHeld(f"another coordinator holds the lease of {args.store}: hand the"
                            " rollout to it with 'pymigrate fleet create-rollout'",
                            path=args.store) from None
        try:
            rec = await _record(store, spec.rollout_id)
            if rec is None:
                now = int(time.time() * 1000)
                await store.save_rollout(RolloutRecord(
                    spec.rollout_id, _ENC.encode(spec).decode(), _ENC.encode(spec.plan).decode(),
                    PENDING, created_ms=now, updated_ms=now))
            elif rec.status != PENDING and (rec.backend != BACKEND or rec.status in FINAL):
                raise FleetError(f"rollout {spec.rollout_id!r} exists ({rec.status}"
                                 f"{', backend ' + rec.backend if rec.backend else ''}):"
                                 " give the spec a new rollout_id", reason="exists")
            res = await coord.run_rollout(spec.rollout_id)
        finally:
            await coord.stop()
    finally:
        await store.close()
    return {"backend": backend.name, "aws_jobs_created": backend.jobs_created,
            **msgspec.to_builtins(res)}


async def _record(store: FleetStore, rollout_id: str) -> RolloutRecord | None:
    return next((r for r in await store.load_rollouts() if r.rollout_id == rollout_id), None)


async def aws_control(args: argparse.Namespace) -> dict[str, Any]:
    """``abort`` / ``cancel --backend aws-iot-jobs``: cancel the rollout's current job."""
    if args.cmd not in ("abort", "cancel"):
        raise ConfigError("--backend", f"{args.cmd} is not available on the aws-iot-jobs "
                          "backend (AWS IoT jobs cannot be paused); use abort or cancel")
    code = ABORT_CODE if args.cmd == "abort" else CANCEL_CODE
    comment = f"operator_{args.cmd}"
    store = open_store(args.store)
    await store.open()
    try:
        backend: AwsJobsBackend | None = None
        for _ in range(CONTROL_TRIES):
            rec = await _record(store, args.rollout)
            if rec is None:
                raise UnknownRollout(f"unknown rollout {args.rollout!r} in {args.store}",
                                     rollout_id=args.rollout)
            if rec.status == PENDING:  # not started: nothing in AWS yet
                await store.save_rollout(msgspec.structs.replace(
                    rec, status=CANCELLED, reason=comment, updated_ms=int(time.time() * 1000),
                    finished_ms=int(time.time() * 1000)))
                await store.notify_changes()
                return {"rollout_id": args.rollout, "status": CANCELLED, "was": PENDING}
            if rec.backend != BACKEND:
                raise FleetError(f"rollout {args.rollout!r} runs on the built-in MQTT backend:"
                                 " send the command with --broker", reason="wrong_backend")
            if rec.status in FINAL or rec.status == ROLLING_BACK:
                return {"rollout_id": args.rollout, "status": rec.status,
                        "reason": rec.reason, "cancelled_job": ""}
            waves = progress_of(rec).waves
            if waves and waves[-1].gate == "open":
                backend = backend or backend_of(args)
                job_id = waves[-1].job_id
                job = await backend.describe_job(job_id)
                if job is not None and job.get("status") in JOB_STOPPED:
                    return {"rollout_id": args.rollout, "status": rec.status,
                            "cancelled_job": job_id, "already": True}
                if job is not None:
                    try:
                        await backend.cancel(job_id, comment, code)
                    except AwsJobsError:  # the job completed meanwhile: the next wave
                        pass
                    else:
                        return {"rollout_id": args.rollout, "status": rec.status,
                                "cancelled_job": job_id, "reason_code": code}
            # between two waves (or the job is being created): read again
            await asyncio.sleep(CONTROL_PAUSE_S)
        raise FleetError(f"rollout {args.rollout!r} has no job in progress to cancel (is"
                         " 'serve --backend aws-iot-jobs' running?); try again",
                         reason="no_current_job")
    finally:
        await store.close()
