"""AWS IoT Jobs as a rollout backend: the same rollout spec drives AWS instead of the
built-in MQTT job topics (``backend = "aws-iot-jobs"``).

Mapping of a :class:`~cloud.fleet.spec.RolloutSpec` (AWS IoT API reference, CreateJob):

* one IoT job per wave (``<rollout>-w<index>``), waves sized by the spec's plan
  (:func:`cloud.fleet.spec.wave_sizes`); targets: the wave's thing ARNs (up to
  ``MAX_DIRECT_TARGETS``) or a static thing group ``<rollout>-w<index>`` holding them;
* pacing: ``jobExecutionsRolloutConfig.maximumPerMinute`` = the spec's
  ``max_notifications_per_min`` (AWS allows 1..1000);
* failure gate: ``abortConfig`` (CANCEL when FAILED / TIMED_OUT executions pass
  ``(1 - success_threshold)`` x 100 % of the executed things, judged once
  ``max(min_executed, advance_fraction x wave)`` things executed: AWS's percentage is of
  the executed things, so judging it early would abort on a few unlucky first results).
  AWS enforces it; :class:`AwsRollout` also gates each wave itself from the executions it
  reads back, like the built-in engine: the wave fails once it can no longer reach
  ``success_threshold``, and passes when every execution is final;
* per-device timeout: ``timeoutConfig.inProgressTimeoutInMinutes`` =
  ``ceil(device_timeout_s / 60)``;
* progress: ``ListJobExecutionsForJob`` (paginated) counted by status;
* rollback: a new job ``<rollout>-rollback`` targeting the devices that had succeeded,
  with ``{"operation": "rollback", "rollout": ..., "document": ...}`` as its document.

boto3 is an optional dependency (``pip install pymigrate-iot[aws]``); its calls are
blocking, so they run in a worker thread. Credentials and region come from the usual AWS
chain (environment, profile, instance role). Waiting between reads is a clock sleep of
``poll_s``; nothing else polls.

What this module does not do: the coordinator's per-device state machine (retries,
offline waits, soak health) stays with the built-in backend; on AWS those are the job
service's (``timeoutConfig``, job execution retries are not configured here).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import structlog

from cloud.fleet.spec import RolloutSpec, effective_plan, wave_sizes
from pymigrate.clock import Clock, WallClock
from pymigrate.errors import PyMigrateError, TransportError

log = structlog.get_logger("pymigrate.fleet.aws")

MAX_DIRECT_TARGETS = 100
TERMINAL = ("SUCCEEDED", "FAILED", "TIMED_OUT", "REJECTED", "REMOVED", "CANCELED")
FAILED = ("FAILED", "TIMED_OUT", "REJECTED")


class AwsJobsError(PyMigrateError):
    """An AWS IoT Jobs call failed (``retriable`` for throttling / service errors)."""

    reason = "aws_iot_jobs"


def job_request(spec: RolloutSpec, job_id: str, targets: list[str],
                document: dict[str, Any], wave_size: int = 0) -> dict[str, Any]:
    """The CreateJob parameters of one wave (``wave_size`` things) of ``spec``."""
    gate = spec.gate
    threshold = round(max(0.0, min(100.0, (1.0 - gate.success_threshold) * 100)), 2)
    judge = max(1, gate.min_executed, math.ceil(wave_size * min(1.0, gate.advance_fraction)))
    criteria = [{"failureType": ft, "action": "CANCEL", "thresholdPercentage": threshold,
                 "minNumberOfExecutedThings": judge}
                for ft in ("FAILED", "TIMED_OUT")]
    return {
        "jobId": job_id,
        "targets": targets,
        "document": json.dumps(document, separators=(",", ":")),
        "description": f"pymigrate rollout {spec.rollout_id}",
        "targetSelection": "SNAPSHOT",
        "jobExecutionsRolloutConfig": {
            "maximumPerMinute": max(1, min(1000, spec.max_notifications_per_min))},
        "abortConfig": {"criteriaList": criteria},
        "timeoutConfig": {
            "inProgressTimeoutInMinutes": max(1, math.ceil(spec.device_timeout_s / 60))},
    }


class AwsJobsBackend:
    """Thin async wrapper over the boto3 ``iot`` client calls a rollout needs."""

    name = "aws-iot-jobs"

    def __init__(self, client: Any, *, account: str = "", region: str = "") -> None:
        self.client = client
        self.region = region or str(client.meta.region_name)
        self.account = account
        self.jobs_created = 0
        self.max_direct_targets = MAX_DIRECT_TARGETS

    @classmethod
    def from_environment(cls, region: str = "", profile: str = "") -> AwsJobsBackend:
        """A backend on the usual AWS credential chain (env, profile, role)."""
        try:
            import boto3
        except ImportError as exc:  # pragma: no cover - the [aws] extra
            raise AwsJobsError("the aws-iot-jobs backend needs boto3: pip install "
                               "'pymigrate-iot[aws]'", reason="missing_boto3") from exc
        session = boto3.Session(profile_name=profile or None, region_name=region or None)
        return cls(session.client("iot"))

    async def _call(self, name: str, **kw: Any) -> Any:
        fn: Callable[..., Any] = getattr(self.client, name)
        try:
            return await asyncio.to_thread(fn, **kw)
        except Exception as exc:  # botocore errors stay behind this boundary
            code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
            retriable = code in ("ThrottlingException", "ServiceUnavailableException",
                                 "InternalFailureException")
            cls = TransportError if retriable else AwsJobsError
            raise cls(f"AWS IoT {name} failed: {code or exc!r}", reason=code or "aws") \
                from exc

    async def _account(self) -> str:
        if not self.account:
            import boto3

            sts = boto3.client("sts", region_name=self.region)
            ident = await asyncio.to_thread(sts.get_caller_identity)
            self.account = str(ident["Account"])
        return self.account

    async def targets(self, job_id: str, things: Sequence[str]) -> list[str]:
        """Thing ARNs, or a static thing group holding ``things`` when there are many."""
        if len(things) <= self.max_direct_targets:
            acct = await self._account()
            return [f"arn:aws:iot:{self.region}:{acct}:thing/{t}" for t in things]
        group = await self._call("create_thing_group", thingGroupName=job_id)
        for t in things:
            await self._call("add_thing_to_thing_group", thingGroupName=job_id, thingName=t)
        return [str(group["thingGroupArn"])]

    async def create_job(self, spec: RolloutSpec, job_id: str, things: Sequence[str],
                         document: dict[str, Any]) -> dict[str, Any]:
        """Create one job; returns the CreateJob request sent."""
        req = job_request(spec, job_id, await self.targets(job_id, things), document,
                          len(things))
        await self._call("create_job", **req)
        self.jobs_created += 1
        log.debug("aws iot job created", job=job_id, things=len(things))
        return req

    async def executions(self, job_id: str) -> dict[str, str]:
        """Thing name -> execution status of ``job_id`` (all pages)."""
        out: dict[str, str] = {}
        token = ""
        while True:
            kw: dict[str, Any] = {"jobId": job_id, "maxResults": 250}
            if token:
                kw["nextToken"] = token
            page = await self._call("list_job_executions_for_job", **kw)
            for e in page.get("executionSummaries", []):
                arn = str(e.get("thingArn", ""))
                out[arn.rsplit("/", 1)[-1]] = str(e["jobExecutionSummary"]["status"])
            token = page.get("nextToken") or ""
            if not token:
                return out

    async def cancel(self, job_id: str, reason: str) -> None:
        await self._call("cancel_job", jobId=job_id, reasonCode="pymigrate_gate",
                         comment=reason[:2000], force=False)


class AwsRolloutResult(msgspec.Struct):
    """Outcome of :meth:`AwsRollout.run`."""

    rollout_id: str
    status: str  # completed / aborted
    reason: str = ""
    jobs: list[str] = msgspec.field(default_factory=list)
    counts: dict[str, int] = msgspec.field(default_factory=dict)
    rollback_job: str = ""


class AwsRollout:
    """Runs a rollout spec wave by wave as AWS IoT jobs, gating each wave on the
    executions read back (see the module docstring)."""

    def __init__(self, backend: AwsJobsBackend, spec: RolloutSpec, things: Sequence[str], *,
                 clock: Clock | None = None, poll_s: float = 30.0) -> None:
        self.backend = backend
        self.spec = spec
        self.things = list(things)
        self.clock = clock or WallClock()
        self.poll_s = poll_s
        self.status: dict[str, str] = {}  # thing -> last execution status

    def document(self) -> dict[str, Any]:
        """The job document devices get (the spec's document, as JSON)."""
        return {"operation": "apply", "rollout": self.spec.rollout_id,
                "document": msgspec.to_builtins(self.spec.document)}

    async def run(self) -> AwsRolloutResult:
        res = AwsRolloutResult(self.spec.rollout_id, "completed")
        sizes = wave_sizes(len(self.things), effective_plan(len(self.things), self.spec))
        start = 0
        for i, size in enumerate(sizes):
            wave = self.things[start:start + size]
            start += size
            job_id = f"{self.spec.rollout_id}-w{i}"
            await self.backend.create_job(self.spec, job_id, wave, self.document())
            res.jobs.append(job_id)
            failed = await self._wait_wave(job_id, wave)
            if failed:
                res.status, res.reason = "aborted", failed
                await self.backend.cancel(job_id, failed)
                res.rollback_job = await self._rollback()
                break
        res.counts = dict(Counter(self.status.values()))
        return res

    async def _wait_wave(self, job_id: str, wave: list[str]) -> str:
        gate = self.spec.gate
        while True:
            ex = await self.backend.executions(job_id)
            self.status.update(ex)
            done = [s for t in wave if (s := ex.get(t, "QUEUED")) in TERMINAL]
            bad = sum(1 for s in done if s in FAILED)
            # like the built-in gate: fail once the wave can no longer reach the threshold
            allowed = (1.0 - gate.success_threshold) * len(wave)
            if bad > allowed and (len(done) >= gate.min_executed or len(done) == len(wave)):
                return f"wave gate: {bad} of {len(done)} executions failed in {job_id}"
            if len(done) == len(wave):
                return ""
            await self.clock.sleep(self.poll_s)

    async def _rollback(self) -> str:
        ok = [t for t, s in self.status.items() if s == "SUCCEEDED"]
        if not ok:
            return ""
        job_id = f"{self.spec.rollout_id}-rollback"
        await self.backend.create_job(self.spec, job_id, ok,
                                      {**self.document(), "operation": "rollback"})
        return job_id
