"""An emulation of the AWS IoT Jobs device MQTT API on a private Mosquitto, following the
documented message shapes (AWS IoT developer guide, "Jobs device MQTT API operations"):
notify-next, start-next(/accepted|/rejected), <jobId>/update(/accepted|/rejected) with
expectedVersion checks, versionNumber bumped on every accepted update, and terminal
statuses final. ``$aws/...`` topics are fixed names, so each test gets its own broker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiomqtt

from tests.conftest import free_port, require_binary, service_up

TERMINAL = ("SUCCEEDED", "FAILED", "REJECTED", "CANCELED", "REMOVED", "TIMED_OUT")


@asynccontextmanager
async def private_mosquitto(tmp_path: Path) -> AsyncIterator[int]:
    """A plain Mosquitto on a free loopback port; yields the port, kills it after."""
    binary = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK)
        else require_binary("mosquitto"))
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"user root\npersistence false\nlistener {port} 127.0.0.1\n"
                    "allow_anonymous true\n")
    proc = await asyncio.create_subprocess_exec(binary, "-c", str(conf),
                                                stdout=subprocess.DEVNULL,
                                                stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):  # bounded: 5 s
            if service_up("127.0.0.1", port, timeout=0.2) or proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
        yield port
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


class AwsJobsEmulator:
    """The service side of the AWS IoT Jobs device API for any number of things."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.jobs: dict[str, list[dict[str, Any]]] = {}  # thing -> executions, in order
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.history: dict[tuple[str, str], list[dict[str, Any]]] = {}  # accepted updates
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> AwsJobsEmulator:
        self._client = aiomqtt.Client("127.0.0.1", self.port, identifier="aws-iot-jobs-emu")
        await self._client.__aenter__()
        await self._client.subscribe("$aws/things/+/jobs/start-next", qos=1)
        await self._client.subscribe("$aws/things/+/jobs/+/update", qos=1)
        self._task = asyncio.create_task(self._serve(), name="test[aws-jobs-emu]")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._client is not None:
            await self._client.__aexit__(None, None, None)

    def _next(self, thing: str) -> dict[str, Any] | None:
        for ex in self.jobs.get(thing, []):
            if ex["status"] in ("QUEUED", "IN_PROGRESS"):
                return ex
        return None

    async def _pub(self, thing: str, suffix: str, body: dict[str, Any]) -> None:
        assert self._client is not None
        await self._client.publish(f"$aws/things/{thing}/jobs/{suffix}",
                                   json.dumps(body).encode(), qos=1)

    async def add_job(self, thing: str, job_id: str, document: dict[str, Any]) -> None:
        """CreateJob for one thing: queue an execution; notify-next if it is the next."""
        before = self._next(thing)
        now = int(time.time())
        self.jobs.setdefault(thing, []).append({
            "jobId": job_id, "thingName": thing, "jobDocument": document, "status": "QUEUED",
            "queuedAt": now, "lastUpdatedAt": now, "versionNumber": 1, "executionNumber": 1})
        if before is None:
            await self._notify_next(thing)

    async def _notify_next(self, thing: str) -> None:
        nxt = self._next(thing)
        body: dict[str, Any] = {"timestamp": int(time.time())}
        if nxt is not None:
            body["execution"] = dict(nxt)
        await self._pub(thing, "notify-next", body)

    def execution(self, thing: str, job_id: str) -> dict[str, Any]:
        return next(e for e in self.jobs[thing] if e["jobId"] == job_id)

    async def _serve(self) -> None:
        assert self._client is not None
        async for m in self._client.messages:
            parts = str(m.topic).split("/")
            thing, body = parts[2], json.loads(bytes(m.payload))  # type: ignore[arg-type]
            self.requests.append((str(m.topic), body))
            token = body.get("clientToken")
            if parts[-1] == "start-next":
                nxt = self._next(thing)
                out: dict[str, Any] = {"timestamp": int(time.time()), "clientToken": token}
                if nxt is not None:
                    if nxt["status"] == "QUEUED":
                        nxt.update(status="IN_PROGRESS", versionNumber=nxt["versionNumber"] + 1,
                                   statusDetails=body.get("statusDetails", {}))
                    out["execution"] = dict(nxt)
                await self._pub(thing, "start-next/accepted", out)
            else:
                await self._update(thing, parts[4], body, token)

    async def _update(self, thing: str, job_id: str, body: dict[str, Any], token: Any) -> None:
        try:
            ex = self.execution(thing, job_id)
        except (KeyError, StopIteration):
            await self._pub(thing, f"{job_id}/update/rejected", {
                "code": "ResourceNotFound", "message": "no such job execution",
                "timestamp": int(time.time()), "clientToken": token})
            return
        state = {"status": ex["status"], "statusDetails": ex.get("statusDetails", {}),
                 "versionNumber": ex["versionNumber"]}
        code = ""
        if "expectedVersion" in body and body["expectedVersion"] != ex["versionNumber"]:
            code = "VersionMismatch"
        elif ex["status"] in TERMINAL:
            code = "InvalidStateTransition"
        elif body.get("status") not in ("IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED"):
            code = "InvalidRequest"
        elif not all(isinstance(v, str) for v in body.get("statusDetails", {}).values()):
            code = "InvalidRequest"  # statusDetails is a map of string to string
        if code:
            await self._pub(thing, f"{job_id}/update/rejected", {
                "code": code, "message": code, "timestamp": int(time.time()),
                "clientToken": token, "executionState": state})
            return
        ex.update(status=body["status"], statusDetails=body.get("statusDetails", {}),
                  versionNumber=ex["versionNumber"] + 1, lastUpdatedAt=int(time.time()))
        self.history.setdefault((thing, job_id), []).append(dict(body))
        out: dict[str, Any] = {"timestamp": int(time.time()), "clientToken": token}
        if body.get("includeJobExecutionState"):
            out["executionState"] = {"status": ex["status"],
                                     "statusDetails": ex["statusDetails"],
                                     "versionNumber": ex["versionNumber"]}
        await self._pub(thing, f"{job_id}/update/accepted", out)
        if ex["status"] in TERMINAL:
            await self._notify_next(thing)
