"""Harness for crash and failover runs of real ``pymigrate fleet serve`` processes.

* :class:`FakeFleet`: simulated devices on a real broker (one MQTT connection per 250
  devices). Each counts every notification it receives per (job, attempt, op), checks
  its signature, reports start, progress and success like ``agent.jobs.JobsClient``
  (a job it already applied is answered, never applied again).
* :class:`ServeProcess`: one ``pymigrate fleet serve`` child process (kill -9 / SIGTERM).
* :func:`audit`: replays the persisted transition log: every device's chain must be
  unbroken (each transition starts where the previous one ended) and end in its current
  state, and every notification a device received must have a durable NOTIFIED (or
  ROLLING_BACK) transition for that attempt: nothing a device heard of was lost.

Used by ``python -m bench fleet-failover`` and the kill -9 / failover tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from cloud.fleet.states import DeviceState
from cloud.fleet.store import FleetStore
from transports.jobs_mqtt import MqttDeviceHub
from transports.jobs_protocol import JobNotify, JobResult, JobStart, JobUpdate, decode, encode
from transports.jobs_security import SignatureError, verify

S = DeviceState
ROOT = Path(__file__).resolve().parent.parent


class FakeFleet:
    """Simulated devices on a broker that count what they are told."""

    def __init__(self, host: str, port: int, prefix: str, devices: Sequence[str], *,
                 verify_key: Ed25519PublicKey | None, update_s: tuple[float, float] = (0.1, 0.4),
                 seed: int = 1, per_hub: int = 250, tls: Any = None) -> None:
        self.host, self.port, self.prefix = host, port, prefix
        self.devices = list(devices)
        self.verify_key = verify_key
        self.update_s = update_s
        self.rng = random.Random(seed)
        self.per_hub = per_hub
        self.tls = tls
        self.hubs: list[MqttDeviceHub] = []
        self.links: dict[str, Any] = {}
        self.deliveries: Counter[tuple[str, str, int, str]] = Counter()
        self.applied: Counter[tuple[str, str]] = Counter()
        self.succeeded: set[tuple[str, str]] = set()
        self.bad_signatures = 0
        self.refusals = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Connect and subscribe every device (no pull yet: see :meth:`pull`)."""
        for i in range(0, len(self.devices), self.per_hub):
            hub = MqttDeviceHub(self.host, self.port, prefix=self.prefix,
                                client_id=f"{self.prefix}-fake-{i}", tls=self.tls)
            await hub.start()
            self.hubs.append(hub)
            for dev in self.devices[i:i + self.per_hub]:
                link = hub.link(dev)
                await link.connect(self._handler(dev))
                self.links[dev] = link

    async def pull(self) -> None:
        """Every device asks for pending work (as a JobsClient does on connect)."""
        for dev, link in self.links.items():
            await link.publish("start", encode(JobStart(dev)))

    async def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for hub in self.hubs:
            await hub.stop()

    def _handler(self, dev: str) -> Any:
        async def on_message(kind: str, payload: bytes) -> None:
            msg = decode(kind, payload)
            if not isinstance(msg, JobNotify):
                return
            if self.verify_key is not None:
                try:
                    verify(msg, self.verify_key)
                except SignatureError:
                    self.bad_signatures += 1
                    return
            if msg.op == "refused":
                self.refusals += 1
                return
            key = (dev, msg.job_id, msg.attempt, msg.op)
            self.deliveries[key] += 1
            if self.deliveries[key] > 1 or msg.op != "apply":
                return  # a duplicate is counted, never acted on twice
            task = asyncio.create_task(self._run(dev, msg), name=f"fake[{dev}]")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        return on_message

    async def _run(self, dev: str, msg: JobNotify) -> None:
        link = self.links[dev]
        if (dev, msg.job_id) in self.succeeded:  # a new attempt of a job done here
            await link.publish("result", encode(JobResult(dev, msg.job_id, "succeeded",
                                                          msg.attempt)))
            return
        self.applied[(dev, msg.job_id)] += 1
        await link.publish("start", encode(JobStart(dev, msg.job_id, msg.attempt)))
        lo, hi = self.update_s
        half = self.rng.uniform(lo, hi) / 2
        await asyncio.sleep(half)
        await link.publish("update", encode(JobUpdate(dev, msg.job_id, msg.attempt, 0.5)))
        await asyncio.sleep(half)
        self.succeeded.add((dev, msg.job_id))
        await link.publish("result", encode(JobResult(dev, msg.job_id, "succeeded",
                                                      msg.attempt)))

    @property
    def duplicate_notifications(self) -> int:
        """Deliveries beyond the first of the same (device, job, attempt, op)."""
        return sum(n - 1 for n in self.deliveries.values() if n > 1)

    @property
    def notified(self) -> int:
        """Distinct notifications received."""
        return len(self.deliveries)


class ServeProcess:
    """A ``pymigrate fleet serve`` child process."""

    def __init__(self, args: Sequence[str], log_path: Path) -> None:
        self.args = list(args)
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"  # log lines reach the file as they happen
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        log = self.log_path.open("ab")  # the child keeps its own descriptor
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pymigrate.cli", "fleet", "serve", *self.args,
                stdout=log, stderr=log, env=env, cwd=str(ROOT))
        finally:
            log.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def kill9(self) -> None:
        """SIGKILL: no flush, no clean disconnect, no lease release."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def stop(self, grace_s: float = 15.0) -> int:
        """SIGTERM, then SIGKILL after ``grace_s``; returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), grace_s)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        return int(self.proc.returncode or 0)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


async def audit(store: FleetStore, rollout_id: str, fleet: FakeFleet) -> dict[str, int]:
    """Transitions lost (broken chains, state mismatches, notifications heard without a
    durable transition) as counts; all zero when nothing was lost."""
    log = await store.load_transitions(rollout_id)
    states = {r.device_id: r.state for r in await store.load_device_states(rollout_id)}
    last: dict[str, int] = {}
    broken = 0
    durable: set[tuple[str, int, str]] = set()
    for t in log:
        if last.get(t.device_id, S.QUEUED) != t.src:
            broken += 1
        last[t.device_id] = t.dst
        if t.dst == S.NOTIFIED:
            durable.add((t.device_id, t.attempt, "apply"))
        elif t.dst == S.ROLLING_BACK:
            durable.add((t.device_id, t.attempt, "rollback"))
    mismatched = sum(1 for d, st in states.items() if last.get(d, S.QUEUED) != st)
    unrecorded = sum(1 for (dev, job, att, op) in fleet.deliveries
                     if job == rollout_id and (dev, att, op) not in durable)
    return {"broken_chains": broken, "state_mismatches": mismatched,
            "notified_without_durable_transition": unrecorded,
            "transitions_logged": len(log)}


async def wait_for(predicate: Any, within_s: float, step: float = 0.05) -> bool:
    """Poll an async or sync predicate until true or ``within_s`` seconds passed."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within_s
    while loop.time() < end:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return True
        await asyncio.sleep(step)
    return False
