"""Device side of fleet jobs: receive, apply atomically, report, roll back.

:class:`JobsClient` listens on the device's job topics (push) and asks for pending jobs
whenever it (re)connects (pull). A config job replaces the agent's config file
atomically (temp file + fsync + ``os.replace``) keeping the previous file as
``<config>.prev``, then calls ``apply_config``; a command job runs a named hook (e.g. a
firmware step). After applying, the client waits ``check_delay_s`` and runs its own
health check: if unhealthy it restores the previous config and reports failure.
During the soak it reports health every ``health_interval_s``; if health turns bad it
rolls back by itself. A rollback command restores ``<config>.prev``. Finished jobs are
remembered in ``<config>.jobs.json``, so a re-delivered notification is answered with
the earlier result instead of being applied twice; a job is also marked ``applying``
(durably, after the previous config was saved) before it is applied, so a device that
crashed mid-apply restores the previous config when the job comes again and reports
``interrupted`` (retriable) instead of applying on top of a half-applied state.

Trust: with ``verify_key`` every notification must carry a valid Ed25519 signature of
the coordinator (``transports.jobs_security``); an unsigned or forged one is refused,
counted in :attr:`JobsClient.untrusted` and reported to the coordinator as a
``JobUpdate.refused`` note that changes no job state. A config document must not carry
secrets in clear: ``${secret:NAME}`` references are resolved from the device's local
``secrets_file`` when the new config is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from pymigrate.clock import Clock
from pymigrate.errors import PyMigrateError
from transports.jobs_protocol import (
    Health,
    JobDocument,
    JobNotify,
    JobResult,
    JobStart,
    JobUpdate,
    ProtocolError,
    decode,
    encode,
)
from transports.jobs_security import (
    SecretError,
    SignatureError,
    check_config_content,
    load_secrets,
    resolve_secrets,
    verify,
)

if TYPE_CHECKING:
    from agent.firmware import FirmwareUpdater

log = structlog.get_logger("pymigrate.agent.jobs")

ApplyConfig = Callable[[Path], Awaitable[None] | None]
HealthCheck = Callable[[], Awaitable[Health] | Health]
Hook = Callable[[Mapping[str, Any], bool], Awaitable[None] | None]


class DeviceLink(Protocol):
    """The device's side of its job topics (see ``transports.jobs_mqtt``)."""

    async def connect(self, handler: Callable[[str, bytes], Awaitable[None]]) -> None:
        """Subscribe to this device's notify topic and deliver ``(kind, payload)``."""

    async def publish(self, kind: str, payload: bytes) -> None:
        """Publish a document on this device's ``kind`` topic."""

    async def close(self) -> None:
        """Unsubscribe / disconnect."""


class JobError(PyMigrateError):
    """A job could not be applied; ``retriable`` says whether trying again may help."""

    reason = "job_failed"


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, ``os.replace``)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class JobsClient:
    """Fleet jobs client of one device."""

    def __init__(self, device_id: str, *, channel: DeviceLink, apply_config: ApplyConfig,
                 health: HealthCheck, clock: Clock, config_path: str | Path,
                 hooks: Mapping[str, Hook] | None = None, check_delay_s: float = 5.0,
                 health_interval_s: float = 30.0, soak_reports: int = 4,
                 heartbeat_s: float = 0.0, verify_key: Ed25519PublicKey | None = None,
                 secrets_file: str | Path | None = None,
                 firmware: FirmwareUpdater | None = None) -> None:
        self.device_id = device_id
        self.channel = channel
        self.apply_config = apply_config
        self.health = health
        self.clock = clock
        self.config_path = Path(config_path)
        self.prev_path = self.config_path.with_name(self.config_path.name + ".prev")
        self.state_path = self.config_path.with_name(self.config_path.name + ".jobs.json")
        self.hooks = dict(hooks or {})
        self.check_delay_s = check_delay_s
        self.health_interval_s = health_interval_s
        self.soak_reports = soak_reports
        self.heartbeat_s = heartbeat_s  # > 0: report health this often (last-seen health)
        self.verify_key = verify_key  # None: signatures are not checked (allow_unsigned)
        self.secrets_file = Path(secrets_file) if secrets_file else None
        self.firmware = firmware  # runs "firmware" command jobs (agent.firmware)
        self.untrusted: dict[str, int] = {}  # refused notifications by reason
        self.interrupted = 0
        self._queue: asyncio.Queue[JobNotify] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._soak: asyncio.Task[None] | None = None
        self._done: dict[str, dict[str, Any]] = self._load_state()
        self.refusals = 0
        self.rejected = 0
        self.applied = 0
        self.rolled_back = 0

    # -- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        """Subscribe, start the worker and pull pending jobs."""
        await self.channel.connect(self._on_message)
        register = getattr(self.channel, "on_reconnect", None)
        if callable(register):  # links that reconnect by themselves tell us: pull then
            register(self.pull)
        task = asyncio.create_task(self._worker(), name=f"agent[jobs:{self.device_id}]")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if self.heartbeat_s > 0:
            hb = asyncio.create_task(self._heartbeat(), name=f"agent[jobs-hb:{self.device_id}]")
            self._tasks.add(hb)
            hb.add_done_callback(self._tasks.discard)
        await self.pull()

    async def _heartbeat(self) -> None:
        while True:
            await self.clock.sleep(self.heartbeat_s)
            try:
                await self.report_health()
            except Exception as exc:  # a missed heartbeat is not fatal
                log.warning("health heartbeat failed", error=repr(exc))

    async def stop(self) -> None:
        """Stop the worker and any soak reporter; close the link."""
        for t in [*self._tasks, *([self._soak] if self._soak else [])]:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.channel.close()

    async def pull(self) -> None:
        """Ask the coordinator for pending jobs (call after every reconnect)."""
        await self._send(JobStart(self.device_id))

    async def report_health(self, job_id: str | None = None, attempt: int = 0) -> Health:
        """Run the health check and report it."""
        h: Health = await _maybe_await(self.health())
        await self._send(JobUpdate(self.device_id, job_id, attempt, 1.0, h))
        return h

    async def _send(self, msg: JobStart | JobUpdate | JobResult) -> None:
        kind = type(msg).__struct_config__.tag
        await self.channel.publish(str(kind), encode(msg))

    async def _on_message(self, kind: str, payload: bytes) -> None:
        try:
            msg = decode(kind, payload)
        except ProtocolError as exc:
            self.rejected += 1
            log.warning("job document rejected", device=self.device_id, reason=exc.reason)
            return
        if not isinstance(msg, JobNotify) or msg.device_id != self.device_id:
            self.rejected += 1
            return
        if self.verify_key is not None:
            try:
                verify(msg, self.verify_key)
            except SignatureError as exc:
                self.untrusted[exc.reason] = self.untrusted.get(exc.reason, 0) + 1
                log.warning("job notification refused: not signed by the coordinator",
                            device=self.device_id, job=msg.job_id, reason=exc.reason)
                with contextlib.suppress(Exception):
                    await self._send(JobUpdate(self.device_id,
                                               refused=f"{exc.reason}:{msg.job_id}"))
                return
        if msg.op == "refused":
            self.refusals += 1
            log.warning("coordinator refused a report", job=msg.job_id, reason=msg.reason)
            return
        self._queue.put_nowait(msg)

    async def _worker(self) -> None:
        while True:
            msg = await self._queue.get()
            try:
                if msg.op == "apply":
                    await self._apply(msg)
                elif msg.op == "rollback":
                    await self._rollback(msg)
            except Exception as exc:  # report, never die: the coordinator decides
                log.error("job handling failed", job=msg.job_id, error=repr(exc))
                try:
                    await self._result(msg, "failed", reason="internal", retriable=True)
                except Exception as exc2:  # the link is down or refused it: keep serving
                    log.error("job failure not reported", job=msg.job_id, error=repr(exc2))

    # -- state ----------------------------------------------------------------------
    def _load_state(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.state_path.read_bytes())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _remember(self, job_id: str, attempt: int, status: str, reason: str = "") -> None:
        self._done[job_id] = {"attempt": attempt, "status": status, "reason": reason}
        while len(self._done) > 64:
            self._done.pop(next(iter(self._done)))
        try:
            atomic_write(self.state_path, json.dumps(self._done).encode())
        except OSError as exc:  # reporting matters more than remembering
            log.warning("cannot persist job state", path=str(self.state_path), error=str(exc))

    async def _result(self, msg: JobNotify, status: str, *, reason: str = "",
                      retriable: bool = False, health: Health | None = None) -> None:
        self._remember(msg.job_id, msg.attempt, status, reason)
        await self._send(JobResult(self.device_id, msg.job_id, status,  # type: ignore[arg-type]
                                   msg.attempt, retriable, reason, health))

    # -- apply / rollback -----------------------------------------------------------
    async def _apply(self, msg: JobNotify) -> None:
        seen = self._done.get(msg.job_id)
        if (self.firmware is not None and msg.doc is not None and msg.doc.type == "command"
                and msg.doc.hook == "firmware" and "firmware" not in self.hooks):
            if seen is not None and seen["status"] != "applying" and (
                    seen["attempt"] == msg.attempt or seen["status"] == "succeeded"):
                await self._send(JobResult(self.device_id, msg.job_id, seen["status"],
                                           msg.attempt, False, seen.get("reason", "")))
                return
            # "applying" here is not a crash to undo: the firmware updater knows from its
            # own state whether to resume the download or check health after the restart
            await self._apply_firmware(msg, msg.doc)
            return
        if seen is not None and seen["status"] == "applying":
            # this device stopped mid-apply (crash, power loss): the previous config was
            # saved before the mark, restore it and let the coordinator retry
            doc = msg.doc or JobDocument()
            with contextlib.suppress(Exception):
                await self._do(doc, rollback=True)
            self.interrupted += 1
            await self._result(msg, "failed", reason="interrupted", retriable=True)
            return
        if seen is not None and (seen["attempt"] == msg.attempt
                                 or seen["status"] == "succeeded"):
            # re-delivered (QoS 1 duplicate, pull or retry after a coordinator restart):
            # answer with the earlier outcome, never apply twice (.prev must stay the old
            # config)
            await self._send(JobResult(self.device_id, msg.job_id, seen["status"], msg.attempt,
                                       False, seen.get("reason", "")))
            return
        doc = msg.doc or JobDocument()
        if doc.type == "command" and doc.hook not in self.hooks:
            await self._result(msg, "rejected", reason=f"unknown_hook:{doc.hook}")
            return
        content = ""
        if doc.type == "config":
            try:
                check_config_content(doc.content, require_toml=False)  # defence in depth
                secrets = load_secrets(self.secrets_file) if self.secrets_file else {}
                content = resolve_secrets(doc.content, secrets)
            except (SecretError, PyMigrateError) as exc:
                await self._result(msg, "rejected", reason=f"{exc.reason}")
                return
        await self._send(JobStart(self.device_id, msg.job_id, msg.attempt))
        try:
            await self._do(doc, rollback=False, content=content,
                           mark=lambda: self._remember(msg.job_id, msg.attempt, "applying"))
        except Exception as exc:
            retriable = bool(getattr(exc, "retriable", False))
            with contextlib.suppress(Exception):
                await self._do(doc, rollback=True)
            await self._result(msg, "failed", reason=f"apply:{type(exc).__name__}",
                               retriable=retriable)
            return
        self.applied += 1
        await self._check_and_soak(msg, doc)

    async def _apply_firmware(self, msg: JobNotify, doc: JobDocument) -> None:
        from agent.firmware import FirmwareError, phase_progress

        assert self.firmware is not None
        await self._send(JobStart(self.device_id, msg.job_id, msg.attempt))
        self._remember(msg.job_id, msg.attempt, "applying")

        async def report(phase: str, done: int, total: int) -> None:
            try:
                await self._send(JobUpdate(self.device_id, msg.job_id, msg.attempt,
                                           phase_progress(phase, done, total), phase=phase,
                                           bytes_done=done, bytes_total=total))
            except Exception as exc:  # progress is best effort; the result is not
                log.warning("firmware progress not sent", job=msg.job_id, error=repr(exc))

        try:
            await self.firmware.apply(msg.job_id, doc.args, report)
        except FirmwareError as exc:
            if exc.rolled_back:
                self.rolled_back += 1
            log.warning("firmware job did not complete", job=msg.job_id, reason=exc.reason,
                        detail=str(exc))
            await self._result(msg, "rejected" if exc.refused else "failed",
                               reason=f"firmware:{exc.reason}", retriable=exc.retriable)
            return
        self.applied += 1
        await self._check_and_soak(msg, doc)

    async def _check_and_soak(self, msg: JobNotify, doc: JobDocument) -> None:
        await self.clock.sleep(self.check_delay_s)
        try:
            h: Health = await _maybe_await(self.health())
        except Exception as exc:  # a crashing health check is an unhealthy device
            log.warning("post-update health check failed", job=msg.job_id, error=repr(exc))
            h = Health(ok=False)
        if not h.ok:
            await self._do(doc, rollback=True)
            self.rolled_back += 1
            await self._result(msg, "failed", reason="post_update_health", health=h)
            return
        await self._result(msg, "succeeded", health=h)
        if self._soak is not None:
            self._soak.cancel()
        self._soak = asyncio.create_task(self._soak_watch(msg, doc),
                                         name=f"agent[jobs-soak:{self.device_id}]")

    async def _soak_watch(self, msg: JobNotify, doc: JobDocument) -> None:
        for _ in range(self.soak_reports):
            await self.clock.sleep(self.health_interval_s)
            h = await self.report_health(msg.job_id, msg.attempt)
            if not h.ok:
                await self._do(doc, rollback=True)
                self.rolled_back += 1
                await self._result(msg, "rolled_back", reason="soak_health", health=h)
                return

    async def _rollback(self, msg: JobNotify) -> None:
        if self._soak is not None:
            self._soak.cancel()
        seen = self._done.get(msg.job_id)
        if seen is not None and seen["status"] in ("succeeded", "applying"):
            doc = msg.doc or JobDocument()
            try:
                await self._do(doc, rollback=True)
            except Exception as exc:
                await self._result(msg, "rollback_failed",
                                   reason=f"rollback:{type(exc).__name__}")
                return
            self.rolled_back += 1
        await self._result(msg, "rolled_back")

    async def _do(self, doc: JobDocument, *, rollback: bool, content: str = "",
                  mark: Callable[[], None] | None = None) -> None:
        if doc.type == "command":
            if (doc.hook == "firmware" and self.firmware is not None
                    and "firmware" not in self.hooks):
                if rollback:
                    await self.firmware.rollback(doc.args)
                return
            if mark is not None:
                mark()
            await _maybe_await(self.hooks[doc.hook](doc.args, rollback))
            return
        if rollback:
            if not self.prev_path.exists():
                return
            atomic_write(self.config_path, self.prev_path.read_bytes())
        else:
            if self.config_path.exists():
                atomic_write(self.prev_path, self.config_path.read_bytes())
            if mark is not None:  # durable "applying" only once .prev is the old config
                mark()
            atomic_write(self.config_path, content.encode())
            os.chmod(self.config_path, 0o600)  # it may hold resolved secrets
        await _maybe_await(self.apply_config(self.config_path))
