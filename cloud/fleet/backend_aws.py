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
* rollback: the failed wave's job is cancelled (without ``force``: executions in progress
  finish or time out), then a new job ``<rollout>-rollback`` targets the devices that had
  succeeded, with ``{"operation": "rollback", "rollout": ..., "document": ...}``;
* a job cancelled from outside (``pymigrate fleet abort`` / ``cancel``, the AWS console,
  ``abortConfig``) is seen on the next read: reason code ``pymigrate_cancel`` ends the
  rollout as cancelled, any other cancellation aborts it and rolls back;
* devices still QUEUED ``offline_wait_s`` after their wave (or the rollback) started are
  counted as skipped so an offline device does not hold the rollout; their execution
  stays queued in AWS and runs when they return.

Crash safety (:class:`AwsRollout` with a :class:`Journal`): every change of
:class:`AwsProgress` is handed to the journal before the AWS call that depends on it; a
wave's job id is written *before* CreateJob. On restart the rollout reads each recorded
job back (DescribeJob): a job that exists is waited on, one that does not is created, so
no wave's job is created twice and no device gets the same job twice.

boto3 is an optional dependency (``pip install pymigrate-iot[aws]``); its calls are
blocking, so they run in a worker thread. Credentials and region come from the usual AWS
chain (environment, profile, instance role). Waiting between reads is a clock sleep of
``poll_s``; nothing else polls.

What this module does not do: the coordinator's per-device state machine (retries, soak
health) stays with the built-in backend; on AWS those are the job service's
(``timeoutConfig``; job execution retries are not configured here). Pausing a rollout has
no AWS IoT equivalent and is not offered on this backend.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import msgspec
import structlog

from cloud.fleet.spec import RolloutSpec, WavePlan, effective_plan, wave_sizes
from pymigrate.clock import Clock, WallClock
from pymigrate.errors import PyMigrateError, TransportError

log = structlog.get_logger("pymigrate.fleet.aws")

MAX_DIRECT_TARGETS = 100
TERMINAL = ("SUCCEEDED", "FAILED", "TIMED_OUT", "REJECTED", "REMOVED", "CANCELED")
FAILED = ("FAILED", "TIMED_OUT", "REJECTED")
#: job statuses after a CancelJob (DescribeJob ``job.status``)
JOB_STOPPED = ("CANCELED", "CANCELLATION_IN_PROGRESS", "DELETION_IN_PROGRESS")
#: CancelJob reason codes written by pymigrate
GATE_CODE, ABORT_CODE, CANCEL_CODE = "pymigrate_gate", "pymigrate_abort", "pymigrate_cancel"
#: AWS error codes worth retrying (throttling, service faults, expired credentials)
RETRIABLE_CODES = frozenset({"ThrottlingException", "ServiceUnavailableException",
                             "InternalFailureException", "InternalException",
                             "RequestTimeout", "RequestTimeoutException",
                             "ExpiredTokenException"})
#: rollout statuses (the rollout record's ``status``)
RUNNING, ROLLING_BACK = "running", "rolling_back"
COMPLETED, ABORTED, CANCELLED = "completed", "aborted", "cancelled"
FINAL = frozenset({COMPLETED, ABORTED, CANCELLED})


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

    def __init__(self, client: Any, *, account: str = "", region: str = "",
                 sts: Any = None) -> None:
        self.client = client
        self.region = region or str(client.meta.region_name)
        self.account = account
        self.sts = sts  # for the account id of thing ARNs (default: a client of the region)
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
        try:
            session = boto3.Session(profile_name=profile or None, region_name=region or None)
            return cls(session.client("iot"), sts=session.client("sts"))
        except Exception as exc:  # no such profile, no region configured...
            raise AwsJobsError(f"AWS configuration: {exc} (set --region / --profile or the"
                               " AWS_REGION / AWS_PROFILE environment)",
                               reason="aws_config") from exc

    async def _call(self, name: str, **kw: Any) -> Any:
        fn: Callable[..., Any] = getattr(self.client, name)
        try:
            return await asyncio.to_thread(fn, **kw)
        except Exception as exc:  # botocore errors stay behind this boundary
            code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
            retriable = code in RETRIABLE_CODES or (not code and _connection_error(exc))
            cls = TransportError if retriable else AwsJobsError
            raise cls(f"AWS IoT {name} failed: {code or exc!r}", reason=code or "aws") \
                from exc

    async def _account(self) -> str:
        if not self.account:
            if self.sts is None:
                import boto3

                self.sts = boto3.client("sts", region_name=self.region)
            ident = await asyncio.to_thread(self.sts.get_caller_identity)
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

    async def describe_job(self, job_id: str) -> dict[str, Any] | None:
        """DescribeJob's ``job`` (status, reasonCode, comment...), None if there is none."""
        try:
            out = await self._call("describe_job", jobId=job_id)
        except AwsJobsError as exc:
            if exc.reason == "ResourceNotFoundException":
                return None
            raise
        return dict(out["job"])

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
        """Thing name -> execution status of ``job_id`` (all pages; none for a job that
        does not exist)."""
        out: dict[str, str] = {}
        token = ""
        while True:
            kw: dict[str, Any] = {"jobId": job_id, "maxResults": 250}
            if token:
                kw["nextToken"] = token
            try:
                page = await self._call("list_job_executions_for_job", **kw)
            except AwsJobsError as exc:
                if exc.reason == "ResourceNotFoundException":  # deleted: DescribeJob says
                    return out
                raise
            for e in page.get("executionSummaries", []):
                arn = str(e.get("thingArn", ""))
                out[arn.rsplit("/", 1)[-1]] = str(e["jobExecutionSummary"]["status"])
            token = page.get("nextToken") or ""
            if not token:
                return out

    async def cancel(self, job_id: str, reason: str, code: str = GATE_CODE) -> None:
        """CancelJob without ``force``: queued executions are cancelled, executions in
        progress run to their result or timeout."""
        await self._call("cancel_job", jobId=job_id, reasonCode=code,
                         comment=reason[:2000], force=False)


def _connection_error(exc: Exception) -> bool:
    """A network failure on the way to AWS (no answer): worth retrying."""
    if isinstance(exc, OSError):
        return True
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError
    except ImportError:  # pragma: no cover - the [aws] extra
        return False
    return isinstance(exc, BotoConnectionError | HTTPClientError)



class AwsWave(msgspec.Struct):
    """One wave as persisted: positions ``[start, end)`` of the target order, its job."""

    index: int
    start: int
    end: int
    job_id: str
    started_at: float = 0.0  # wall epoch seconds
    planned: int = 0
    gate: str = "open"  # open | passed | failed
    counts: dict[str, int] = msgspec.field(default_factory=dict)  # execution statuses


class AwsProgress(msgspec.Struct):
    """Everything a restart needs to continue a rollout (see the module docstring)."""

    status: str = RUNNING
    reason: str = ""
    waves: list[AwsWave] = msgspec.field(default_factory=list)
    rollback_job: str = ""
    rollback_started_at: float = 0.0
    rollback_counts: dict[str, int] = msgspec.field(default_factory=dict)
    finished_at: float = 0.0


#: (thing, "apply" | "rollback", execution status) seen since the last save
Change = tuple[str, str, str]


class Journal(Protocol):
    """Where :class:`AwsRollout` makes its progress durable."""

    async def save(self, rollout: AwsRollout, changes: list[Change]) -> None:
        """Persist ``rollout.progress`` and the execution ``changes``; return only once
        it is durable (the next AWS call depends on it)."""


class AwsRolloutResult(msgspec.Struct):
    """Outcome of :meth:`AwsRollout.run`."""

    rollout_id: str
    status: str  # completed / aborted / cancelled
    reason: str = ""
    jobs: list[str] = msgspec.field(default_factory=list)
    counts: dict[str, int] = msgspec.field(default_factory=dict)
    rollback_job: str = ""


class AwsRollout:
    """Runs a rollout spec wave by wave as AWS IoT jobs, gating each wave on the
    executions read back; resumes from ``progress`` (see the module docstring)."""

    def __init__(self, backend: AwsJobsBackend, spec: RolloutSpec, things: Sequence[str], *,
                 clock: Clock | None = None, poll_s: float = 30.0,
                 progress: AwsProgress | None = None, journal: Journal | None = None,
                 plan: WavePlan | None = None) -> None:
        self.backend = backend
        self.spec = spec
        self.things = list(things)
        self.clock = clock or WallClock()
        self.poll_s = poll_s
        self.progress = progress or AwsProgress()
        self.journal = journal
        self.plan = plan or effective_plan(len(self.things), spec)
        self.status: dict[str, str] = {}  # thing -> last execution status (apply jobs)
        self.rb_status: dict[str, str] = {}  # thing -> rollback execution status
        self._changes: list[Change] = []

    def document(self) -> dict[str, Any]:
        """The job document devices get (the spec's document, as JSON)."""
        return {"operation": "apply", "rollout": self.spec.rollout_id,
                "document": msgspec.to_builtins(self.spec.document)}

    def result(self) -> AwsRolloutResult:
        p = self.progress
        return AwsRolloutResult(self.spec.rollout_id, p.status, p.reason,
                                [w.job_id for w in p.waves], dict(Counter(self.status.values())),
                                p.rollback_job)

    async def run(self) -> AwsRolloutResult:
        """Run (or continue) the rollout to a final status."""
        p = self.progress
        try:
            if p.status not in FINAL:
                await self._recover()
            if p.status == RUNNING:
                await self._run_waves()
        except AwsJobsError as exc:  # cannot go on: undo what was applied
            log.error("aws iot jobs call failed, rolling back", rollout=self.spec.rollout_id,
                      error=str(exc))
            if p.status == RUNNING:
                p.status, p.reason = ROLLING_BACK, f"aws_error: {exc}"
                await self._save()
        if p.status == ROLLING_BACK:
            try:
                await self._roll_back()
            except AwsJobsError as exc:
                await self._finish(ABORTED, f"{p.reason}; rollback failed: {exc}")
        return self.result()

    # -- steps ------------------------------------------------------------------------
    async def _recover(self) -> None:
        """After a restart: read back the executions of every recorded job."""
        p = self.progress
        for w in p.waves:
            if await self._aws(self.backend.describe_job, w.job_id) is not None:
                w.counts = self._observe(w.job_id, self.things[w.start:w.end],
                                         await self._aws(self.backend.executions, w.job_id))
        if p.rollback_job and await self._aws(self.backend.describe_job,
                                              p.rollback_job) is not None:
            self._observe_rollback(await self._aws(self.backend.executions, p.rollback_job))
        if self._changes:
            await self._save()

    async def _run_waves(self) -> None:
        p = self.progress
        sizes = wave_sizes(len(self.things), self.plan)
        i = 0
        while i < len(p.waves) or i < len(sizes):
            if i == len(p.waves):
                start = p.waves[-1].end if p.waves else 0
                p.waves.append(AwsWave(i, start, start + sizes[i],
                                       f"{self.spec.rollout_id}-w{i}", self._now(),
                                       sizes[i]))
                await self._save()  # the job id is durable before CreateJob
            w = p.waves[i]
            i += 1
            if w.gate != "open":
                continue
            await self._ensure_job(w.job_id, self.things[w.start:w.end], self.document())
            verdict = await self._wait_wave(w)
            if not verdict:
                w.gate = "passed"
                await self._save()
                continue
            kind, reason = verdict
            if kind == CANCELLED:
                await self._settle(w)
                w.gate = "failed"
                await self._finish(CANCELLED, reason)
            else:
                w.gate = "failed"
                p.status, p.reason = ROLLING_BACK, reason
                await self._save()
            return
        await self._finish(COMPLETED, "")

    async def _wait_wave(self, w: AwsWave) -> tuple[str, str] | None:
        """None when the wave passed; else (``aborted`` | ``cancelled``, reason)."""
        gate = self.spec.gate
        wave = self.things[w.start:w.end]
        while True:
            # executions first: one cancelled by a CancelJob is then seen with its job
            ex = await self._aws(self.backend.executions, w.job_id)
            job = await self._aws(self.backend.describe_job, w.job_id)
            w.counts = self._observe(w.job_id, wave, ex)
            if self._changes:
                await self._save()
            stopped = _stopped(w.job_id, job)
            if stopped:
                return stopped
            done = [s for t in wave if (s := ex.get(t, "QUEUED")) in TERMINAL]
            bad = sum(1 for s in done if s in FAILED)
            # like the built-in gate: fail once the wave can no longer reach the threshold
            allowed = (1.0 - gate.success_threshold) * len(wave)
            if bad > allowed and (len(done) >= gate.min_executed or len(done) == len(wave)):
                return ABORTED, f"wave gate: {bad} of {len(done)} executions failed in " \
                                f"{w.job_id}"
            if len(done) == len(wave) or self._offline_over(w.started_at, wave, ex):
                return None
            await self.clock.sleep(self.poll_s)

    async def _roll_back(self) -> None:
        """Cancel the current wave's job, let it settle, then roll back the devices that
        succeeded with a new job and wait for it."""
        p = self.progress
        if p.waves and not p.rollback_job:
            await self._settle(p.waves[-1], cancel=p.reason)
        ok = [t for t in self.things if self.status.get(t) == "SUCCEEDED"]
        if not ok:
            await self._finish(ABORTED, p.reason)
            return
        if not p.rollback_job:
            p.rollback_job = f"{self.spec.rollout_id}-rollback"
            p.rollback_started_at = self._now()
            self._changes += [(t, "rollback", "QUEUED") for t in ok]
            await self._save()  # durable before CreateJob, like a wave's job
        await self._ensure_job(p.rollback_job, ok, {**self.document(), "operation": "rollback"})
        while True:
            ex = await self._aws(self.backend.executions, p.rollback_job)
            job = await self._aws(self.backend.describe_job, p.rollback_job)
            self._observe_rollback(ex)
            p.rollback_counts = dict(Counter(ex.get(t, "QUEUED") for t in ok))
            if self._changes:
                await self._save()
            if job is None or job.get("status") in JOB_STOPPED \
                    or all(ex.get(t, "QUEUED") in TERMINAL for t in ok) \
                    or self._offline_over(p.rollback_started_at, ok, ex):
                break
            await self.clock.sleep(self.poll_s)
        await self._finish(ABORTED, p.reason)

    # -- helpers ----------------------------------------------------------------------
    async def _settle(self, w: AwsWave, cancel: str = "") -> None:
        """Cancel the wave's job (with ``cancel`` as the comment) unless it is stopped,
        then wait until its executions are final: queued ones are cancelled by AWS,
        those in progress run to their result or timeout."""
        wave = self.things[w.start:w.end]
        job = await self._aws(self.backend.describe_job, w.job_id)
        if cancel and job is not None and job.get("status") not in (*JOB_STOPPED,
                                                                    "COMPLETED"):
            await self._aws(self.backend.cancel, w.job_id, cancel)
        while job is not None:
            ex = await self._aws(self.backend.executions, w.job_id)
            w.counts = self._observe(w.job_id, wave, ex)
            if self._changes:
                await self._save()
            if all(ex.get(t, "QUEUED") in TERMINAL for t in wave) \
                    or self._offline_over(w.started_at, wave, ex):
                return
            await self.clock.sleep(self.poll_s)

    async def _ensure_job(self, job_id: str, things: Sequence[str],
                          document: dict[str, Any]) -> None:
        """Create ``job_id`` unless it exists (a restart after CreateJob)."""
        if await self._aws(self.backend.describe_job, job_id) is not None:
            log.info("aws iot job exists, waiting on it", job=job_id)
            return
        try:
            await self._aws(self.backend.create_job, self.spec, job_id, things, document)
        except AwsJobsError as exc:
            if exc.reason != "ResourceAlreadyExistsException":
                raise

    async def _aws(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """An AWS call, retried with backoff while the error is retriable."""
        delay = max(self.poll_s, 0.01)
        while True:
            try:
                return await fn(*args)
            except TransportError as exc:
                log.warning("aws iot call failed, retrying", error=str(exc), retry_s=delay)
                await self.clock.sleep(delay)
                delay = min(delay * 2, 300.0)

    def _observe(self, job_id: str, wave: Sequence[str], ex: dict[str, str]) -> dict[str, int]:
        for t, s in ex.items():
            if self.status.get(t) != s:
                self.status[t] = s
                self._changes.append((t, "apply", s))
        return dict(Counter(ex.get(t, "QUEUED") for t in wave))

    def _observe_rollback(self, ex: dict[str, str]) -> None:
        for t, s in ex.items():
            if self.rb_status.get(t) != s:
                self.rb_status[t] = s
                self._changes.append((t, "rollback", s))

    def _offline_over(self, since: float, things: Sequence[str], ex: dict[str, str]) -> bool:
        """Only queued executions are left and they waited ``offline_wait_s``: the devices
        are offline; go on without them (their executions stay queued in AWS)."""
        left = [ex.get(t, "QUEUED") for t in things if ex.get(t, "QUEUED") not in TERMINAL]
        return (bool(since) and all(s == "QUEUED" for s in left)
                and self._now() - since >= self.spec.offline_wait_s)

    def _now(self) -> float:
        return self.clock.time_ms() / 1000.0

    async def _finish(self, status: str, reason: str) -> None:
        p = self.progress
        p.status, p.reason, p.finished_at = status, reason, self._now()
        await self._save()
        log.info("aws rollout finished", rollout=self.spec.rollout_id, status=status,
                 reason=reason)

    async def _save(self) -> None:
        changes, self._changes = self._changes, []
        if self.journal is not None:
            try:
                await self.journal.save(self, changes)
            except BaseException:
                self._changes[:0] = changes
                raise


def _stopped(job_id: str, job: dict[str, Any] | None) -> tuple[str, str] | None:
    """A wave job cancelled (or deleted) from outside: how the rollout ends."""
    if job is None:
        return ABORTED, f"job {job_id} no longer exists in AWS IoT"
    if job.get("status") not in JOB_STOPPED:
        return None
    code = str(job.get("reasonCode") or "")
    comment = str(job.get("comment") or "")
    if code == CANCEL_CODE:
        return CANCELLED, comment or "operator_cancel"
    if code == ABORT_CODE:
        return ABORTED, comment or "operator_abort"
    return ABORTED, f"job {job_id} was cancelled in AWS IoT" + (
        f" ({code}{': ' + comment if comment else ''})" if code else "")
