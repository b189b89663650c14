"""The AWS IoT Jobs device protocol (MQTT) as a job link for ``agent.jobs.JobsClient``
(``[jobs] protocol = "aws-iot"``).

Reserved topics of thing ``T`` (AWS IoT developer guide, "Jobs device MQTT API")::

    $aws/things/T/jobs/notify-next                 AWS -> device  {"timestamp", "execution"?}
    $aws/things/T/jobs/start-next                  device -> AWS  {"clientToken", ...}
    $aws/things/T/jobs/start-next/accepted|rejected               {"execution"?} / {"code"}
    $aws/things/T/jobs/<jobId>/update              device -> AWS  {"status", "statusDetails",
                                                                   "expectedVersion", ...}
    $aws/things/T/jobs/<jobId>/update/accepted|rejected           {"executionState"} / {"code"}

Translation, both ways, into the project's job messages so the jobs client (apply,
firmware, rollback, remembered results) is the same on both backends:

* a pending execution (notify-next, or the answer to start-next) becomes a ``JobNotify``:
  ``jobDocument = {"operation": "apply" | "rollback", "document": <JobDocument>}`` as
  written by ``cloud.fleet.backend_aws``; attempt = ``executionNumber``. Any other
  document is answered ``REJECTED`` (``statusDetails.reason = "not_a_pymigrate_job"``).
* ``JobStart(job_id=None)`` (pull) -> ``start-next``; ``JobStart(job)`` and progress
  ``JobUpdate`` -> ``update`` ``IN_PROGRESS`` (statusDetails: phase, bytes, progress);
  ``JobResult`` -> ``SUCCEEDED`` / ``FAILED`` / ``REJECTED`` with ``statusDetails.reason``.
  Health reports without a job have no AWS topic and are dropped (counted).
* Every update carries ``expectedVersion``: the execution's ``versionNumber`` as last
  seen, advanced from each ``update/accepted`` (``includeJobExecutionState``). Updates of
  one job are therefore sent one at a time, each waiting for its answer. A
  ``VersionMismatch`` on a still-pending execution (the device's own start-next raced a
  notify-next naming the same job) is resynced from the rejection and sent once more;
  any other rejection raises :class:`TransportError` naming the code.

Trust: AWS IoT authenticates the device (certificate) and authorises the topics (policy);
notifications are not signed by the coordinator key. Firmware images are still verified
against the release key (``agent.firmware``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from pymigrate.clock import Clock
from pymigrate.errors import TransportError
from transports.jobs_mqtt import _Session
from transports.jobs_protocol import (
    JobDocument,
    JobNotify,
    JobResult,
    JobStart,
    JobUpdate,
    ProtocolError,
    decode,
    encode,
)

DeviceHandler = Callable[[str, bytes], Awaitable[None]]
_STATUS = {"succeeded": "SUCCEEDED", "failed": "FAILED", "rejected": "REJECTED",
           "rolled_back": "FAILED", "rollback_failed": "FAILED"}


def jobs_topic(thing: str, suffix: str) -> str:
    """``$aws/things/<thing>/jobs/<suffix>``."""
    return f"$aws/things/{thing}/jobs/{suffix}"


class AwsJobsLink:
    """One thing's AWS IoT Jobs topics on its own MQTT connection (``DeviceLink``)."""

    def __init__(self, hostname: str, port: int, thing: str, *, client_id: str | None = None,
                 username: str | None = None, password: str | None = None,
                 clock: Clock | None = None, tls: ssl.SSLContext | None = None,
                 answer_timeout_s: float = 10.0) -> None:
        self.thing = thing
        self.answer_timeout_s = answer_timeout_s
        self._session = _Session(hostname, port, client_id=client_id or thing,
                                 username=username, password=password, will=None,
                                 on_message=self._route, name=f"agent[jobs-aws:{thing}]",
                                 clock=clock, tls=tls)
        self._handler: DeviceHandler | None = None
        self._versions: dict[str, int] = {}  # jobId -> versionNumber last seen
        self._exec: dict[str, int] = {}  # jobId -> executionNumber
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}  # clientToken ->
        self._locks: dict[str, asyncio.Lock] = {}
        self._delivered: set[tuple[str, int]] = set()  # (jobId, executionNumber) handed on
        self._final: set[str] = set()  # jobs this link reported terminal
        self._closed = False
        self.dropped = 0  # messages with no AWS equivalent (health without a job)
        self.rejected: dict[str, int] = {}  # AWS rejections by code

    # -- DeviceLink -----------------------------------------------------------------
    async def start(self) -> None:
        """Connect and subscribe to the thing's job topics."""
        t = self.thing
        await self._session.open([jobs_topic(t, "notify-next"),
                                  jobs_topic(t, "start-next/accepted"),
                                  jobs_topic(t, "start-next/rejected"),
                                  jobs_topic(t, "+/update/accepted"),
                                  jobs_topic(t, "+/update/rejected")])

    def on_reconnect(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run ``callback`` after the connection came back (the jobs client pulls)."""
        self._session.on_reconnect.append(callback)

    async def connect(self, handler: DeviceHandler) -> None:
        """Deliver translated job notifications to ``handler("notify", payload)``."""
        self._handler = handler

    async def publish(self, kind: str, payload: bytes) -> None:
        """Translate a jobs-client message into an AWS IoT Jobs request."""
        try:
            msg = decode(kind, payload)
        except ProtocolError as exc:  # our own encoder made it: a bug, say so
            raise TransportError(f"cannot translate {kind} for AWS IoT Jobs: {exc}") from exc
        if isinstance(msg, JobStart):
            if msg.job_id is None:  # pull: answered on start-next/accepted (async)
                await self._session.publish(jobs_topic(self.thing, "start-next"), json.dumps(
                    {"clientToken": uuid.uuid4().hex}).encode())
                return
            await self._update(msg.job_id, "IN_PROGRESS", {"phase": "started"})
        elif isinstance(msg, JobUpdate):
            if msg.job_id is None or msg.refused:
                self.dropped += 1
                return
            details = {"progress": f"{msg.progress:.4f}"}
            if msg.phase:
                details.update(phase=msg.phase, bytes_done=str(msg.bytes_done),
                               bytes_total=str(msg.bytes_total))
            await self._update(msg.job_id, "IN_PROGRESS", details)
        elif isinstance(msg, JobResult):
            details = {"result": msg.status, **({"reason": msg.reason} if msg.reason else {})}
            await self._update(msg.job_id, _STATUS[msg.status], details)

    async def close(self) -> None:
        """Disconnect (once); fail whoever waits for an answer."""
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(TransportError("AWS IoT Jobs link closed"))
        if not self._closed:
            self._closed = True
            await self._session.close()

    stop = close  # the supervisor stops links and hubs alike

    # -- requests -------------------------------------------------------------------
    async def _update(self, job_id: str, status: str, details: dict[str, str]) -> None:
        if job_id in self._final:  # a re-sent earlier result: AWS already has it
            self.dropped += 1
            return
        lock = self._locks.setdefault(job_id, asyncio.Lock())
        async with lock:  # one update in flight per job: expectedVersion must be current
            for retry in (True, False):
                if await self._send_update(job_id, status, details, retry):
                    return

    async def _send_update(self, job_id: str, status: str, details: dict[str, str],
                           may_retry: bool) -> bool:
        """One update request; False when it should be sent again (version resynced)."""
        token = uuid.uuid4().hex
        body: dict[str, Any] = {"status": status, "statusDetails": details,
                                "includeJobExecutionState": True, "clientToken": token}
        if job_id in self._versions:
            body["expectedVersion"] = self._versions[job_id]
        if job_id in self._exec:
            body["executionNumber"] = self._exec[job_id]
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[token] = fut
        try:
            await self._session.publish(jobs_topic(self.thing, f"{job_id}/update"),
                                        json.dumps(body).encode())
            async with asyncio.timeout(self.answer_timeout_s):
                answer = await fut
        except TimeoutError as exc:
            raise TransportError(f"no answer from AWS IoT Jobs to the {status} update of"
                                 f" {job_id}", reason="aws_jobs_timeout") from exc
        finally:
            self._waiting.pop(token, None)
        if "code" in answer:
            code = str(answer["code"])
            self.rejected[code] = self.rejected.get(code, 0) + 1
            state = answer.get("executionState") or {}
            if "versionNumber" in state:  # resync for the next update
                self._versions[job_id] = int(state["versionNumber"])
            if (code == "VersionMismatch" and may_retry
                    and state.get("status") in ("QUEUED", "IN_PROGRESS")):
                # our own start-next raced a notify-next (both name the job): the
                # execution is still ours to update, at the version AWS holds now
                return False
            raise TransportError(f"AWS IoT Jobs rejected the {status} update of {job_id}:"
                                 f" {code} {answer.get('message', '')}",
                                 reason=f"aws_{code}")
        state = answer.get("executionState") or {}
        if "versionNumber" in state:
            self._versions[job_id] = int(state["versionNumber"])
        if status != "IN_PROGRESS":
            self._final.add(job_id)
        return True

    # -- incoming -------------------------------------------------------------------
    async def _route(self, name: str, payload: bytes) -> None:
        try:
            body = json.loads(payload)
        except ValueError:
            self.dropped += 1
            return
        if not isinstance(body, dict):
            self.dropped += 1
            return
        token = body.get("clientToken")
        if name.endswith(("/update/accepted", "/update/rejected")):
            fut = self._waiting.get(str(token))
            if fut is not None and not fut.done():
                fut.set_result(body)
            return
        if name.endswith("/start-next/rejected"):
            self.rejected[str(body.get("code"))] = self.rejected.get(str(body.get("code")),
                                                                     0) + 1
            return
        execution = body.get("execution")
        if isinstance(execution, dict):  # notify-next or start-next/accepted
            await self._deliver(execution)

    async def _deliver(self, ex: dict[str, Any]) -> None:
        job_id = str(ex.get("jobId", ""))
        if not job_id or self._handler is None:
            self.dropped += 1
            return
        key = (job_id, int(ex.get("executionNumber", 1)))
        version = int(ex.get("versionNumber", 1))
        if key in self._delivered:  # notify-next and start-next both name it: once,
            # but keep the newer version (start-next moved it to IN_PROGRESS)
            self._versions[job_id] = max(self._versions.get(job_id, 0), version)
            return
        self._delivered.add(key)
        self._final.discard(job_id)
        self._versions[job_id] = version
        self._exec[job_id] = key[1]
        doc = ex.get("jobDocument")
        op = doc.get("operation") if isinstance(doc, dict) else None
        try:
            if op not in ("apply", "rollback"):
                raise msgspec.ValidationError("no pymigrate operation")
            jd = msgspec.convert(doc.get("document") or {}, JobDocument)  # type: ignore[union-attr]
        except msgspec.ValidationError:
            with contextlib.suppress(TransportError):
                await asyncio.shield(self._reject_foreign(job_id))
            return
        notify = JobNotify(job_id, self.thing, op, self._exec[job_id], jd)
        await self._handler("notify", encode(notify))

    async def _reject_foreign(self, job_id: str) -> None:
        # not awaited for its answer: we are inside the reader (no deadlock)
        body = {"status": "REJECTED", "statusDetails": {"reason": "not_a_pymigrate_job"},
                "expectedVersion": self._versions.get(job_id, 1),
                "clientToken": uuid.uuid4().hex}
        await self._session.publish(jobs_topic(self.thing, f"{job_id}/update"),
                                    json.dumps(body).encode())
