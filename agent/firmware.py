"""Firmware jobs on the device: download, verify, install, check, roll back.

A ``firmware`` command job (``transports.jobs_protocol.FirmwareArtifact`` as its args)
runs through :class:`FirmwareUpdater`, called by ``agent.jobs.JobsClient``::

    notify(apply) -> download  HTTP(S) into <dir>/<sha256>.part, resumed with Range after
                               a broken connection or a restart; size <= max_bytes
                  -> verify    size, sha256, and the release key's Ed25519 signature
                  -> install   install_cmd <file> (the A/B slot switch is the hook's job;
                               it may restart the device)
                  -> health    health_cmd, health_delay_s after the install (or after the
                               restart, when the job comes again)
                  -> done, or rollback_cmd and FAILED with the reason

Each phase is written to ``<dir>/state.json`` before it starts, so a restart knows where
the job stood: a download resumes, a finished install ("installed") goes straight to the
health check (that is the post-restart check), an install cut short is rolled back and
reported ``interrupted`` (retriable). Waiting is sleeping on the injected clock; hook
commands run as subprocesses with a timeout.

Refusals (the image is not what was signed: ``sha256_mismatch``, ``size_mismatch``,
``bad_signature``, ``unsigned``, ``too_large``) raise :class:`FirmwareError` with
``refused=True``: nothing was installed, the job is ``rejected`` and the partial file is
deleted. Buffered sensor data is never touched: the updater writes only under its own
directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from pymigrate.clock import Clock
from pymigrate.errors import PyMigrateError, TransportError
from transports.jobs_artifact import ArtifactError, fetch_range
from transports.jobs_protocol import FirmwareArtifact
from transports.jobs_security import SignatureError, verify

log = structlog.get_logger("pymigrate.agent.firmware")

#: ``report(phase, bytes_done, bytes_total)``: progress of the running firmware job
Report = Callable[[str, int, int], Awaitable[None]]
#: share of the job's progress (0..1) reached when each phase starts
PHASE_PROGRESS = {"download": 0.0, "verify": 0.8, "install": 0.85, "health": 0.95}


class FirmwareError(PyMigrateError):
    """A firmware job did not complete. ``refused``: the image was refused before any
    install (job ``rejected``); ``rolled_back``: the rollback hook ran."""

    reason = "firmware"

    def __init__(self, message: str = "", *, reason: str | None = None,
                 retriable: bool | None = None, refused: bool = False,
                 rolled_back: bool = False) -> None:
        super().__init__(message, reason=reason, retriable=retriable)
        self.refused = refused
        self.rolled_back = rolled_back


def phase_progress(phase: str, done: int, total: int) -> float:
    """Overall progress (0..1) of a firmware job in ``phase`` with ``done/total`` bytes."""
    start = PHASE_PROGRESS.get(phase, 0.0)
    if phase == "download" and total > 0:
        return round(PHASE_PROGRESS["verify"] * min(done, total) / total, 4)
    return start


class FirmwareUpdater:
    """Runs firmware jobs of one device (see the module docstring)."""

    def __init__(self, directory: str | Path, *, verify_key: Ed25519PublicKey,
                 install_cmd: Sequence[str], health_cmd: Sequence[str] = (),
                 rollback_cmd: Sequence[str] = (), clock: Clock, max_bytes: int = 64 << 20,
                 health_delay_s: float = 5.0, cmd_timeout_s: float = 300.0,
                 download_retries: int = 5, retry_backoff_s: float = 2.0,
                 http_timeout_s: float = 60.0, ssl_ctx: ssl.SSLContext | None = None,
                 report_every_bytes: int = 256 * 1024) -> None:
        self.dir = Path(directory)
        self.verify_key = verify_key
        self.install_cmd = list(install_cmd)
        self.health_cmd = list(health_cmd)
        self.rollback_cmd = list(rollback_cmd)
        self.clock = clock
        self.max_bytes = max_bytes
        self.health_delay_s = health_delay_s
        self.cmd_timeout_s = cmd_timeout_s
        self.download_retries = download_retries
        self.retry_backoff_s = retry_backoff_s
        self.http_timeout_s = http_timeout_s
        self.ssl_ctx = ssl_ctx
        self.report_every_bytes = report_every_bytes
        self.state_path = self.dir / "state.json"
        self.counters = {"updated": 0, "signature_verified": 0, "downloads_resumed": 0,
                         "refused": 0, "rolled_back": 0, "interrupted": 0}

    # -- state ----------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        try:
            data = json.loads(self.state_path.read_bytes())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _set_state(self, job_id: str, phase: str, version: str) -> None:
        from agent.jobs import atomic_write

        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.state_path, json.dumps(
            {"job": job_id, "phase": phase, "version": version}).encode())

    # -- the job --------------------------------------------------------------------
    async def apply(self, job_id: str, args: Mapping[str, Any], report: Report) -> str:
        """Run firmware job ``job_id`` to a healthy install; return the version. Raises
        :class:`FirmwareError` (reason names the step) when it did not."""
        try:
            art = msgspec.convert(dict(args), FirmwareArtifact)
        except msgspec.ValidationError as exc:
            raise self._refuse(f"firmware job args: {exc}", "bad_args") from exc
        state = self._state()
        phase = state.get("phase") if state.get("job") == job_id else None
        if phase == "installing":  # cut short mid-install: undo, let the coordinator retry
            self.counters["interrupted"] += 1
            await self._rollback(art, job_id)
            raise FirmwareError("install was interrupted", reason="interrupted",
                                retriable=True, rolled_back=True)
        if phase != "installed":
            path = await self._download(job_id, art, report)
            await report("verify", art.size, art.size)
            self._verify(art, path)
            await report("install", art.size, art.size)
            self._set_state(job_id, "installing", art.version)
            code, out = await self._run([*self.install_cmd, str(path)], art, job_id)
            path.unlink(missing_ok=True)  # the slot holds it now; free the budget
            if code != 0:
                await self._rollback(art, job_id)
                raise FirmwareError(f"install hook exited {code}: {out}",
                                    reason=f"install_exit_{code}", rolled_back=True)
            self._set_state(job_id, "installed", art.version)
        # a hook that restarts the device ends the process here; the job comes again
        # after the restart (pull), finds "installed" and checks health
        await report("health", art.size, art.size)
        await self.clock.sleep(self.health_delay_s)
        if self.health_cmd:
            code, out = await self._run(self.health_cmd, art, job_id)
            if code != 0:
                await self._rollback(art, job_id)
                raise FirmwareError(f"health check exited {code}: {out}",
                                    reason=f"health_check_exit_{code}", rolled_back=True)
        self._set_state(job_id, "done", art.version)
        self.counters["updated"] += 1
        log.info("firmware updated", job=job_id, version=art.version)
        return art.version

    async def rollback(self, args: Mapping[str, Any], job_id: str = "") -> None:
        """Run the rollback hook (coordinator rollback, or the agent's own health gate)."""
        art = msgspec.convert(dict(args), FirmwareArtifact)
        await self._rollback(art, job_id)

    async def _rollback(self, art: FirmwareArtifact, job_id: str) -> None:
        self.counters["rolled_back"] += 1
        if self.rollback_cmd:
            code, out = await self._run(self.rollback_cmd, art, job_id)
            if code != 0:
                raise FirmwareError(f"rollback hook exited {code}: {out}",
                                    reason=f"rollback_exit_{code}")
        self._set_state(job_id, "rolled_back", art.version)
        log.warning("firmware rolled back", job=job_id, version=art.version)

    def _refuse(self, message: str, reason: str, path: Path | None = None) -> FirmwareError:
        self.counters["refused"] += 1
        if path is not None:
            path.unlink(missing_ok=True)
        log.warning("firmware refused", reason=reason, detail=message)
        return FirmwareError(message, reason=reason, refused=True)

    # -- steps ----------------------------------------------------------------------
    async def _download(self, job_id: str, art: FirmwareArtifact, report: Report) -> Path:
        if art.size <= 0 or art.size > self.max_bytes:
            raise self._refuse(f"image of {art.size} bytes outside the budget of "
                               f"{self.max_bytes} (jobs.firmware.max_bytes)", "too_large")
        if len(art.sha256) != 64:
            raise self._refuse("sha256 must be 64 hex digits", "bad_args")
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{art.sha256.lower()}.part"
        for stale in self.dir.glob("*.part"):  # one image at a time within the budget
            if stale != path:
                stale.unlink(missing_ok=True)
        self._set_state(job_id, "download", art.version)
        last = [0]

        async def on_bytes(n: int) -> None:
            if n - last[0] >= self.report_every_bytes or n == art.size:
                last[0] = n
                await report("download", n, art.size)

        await report("download", path.stat().st_size if path.exists() else 0, art.size)
        for attempt in range(self.download_retries + 1):
            have = path.stat().st_size if path.exists() else 0
            if 0 < have < art.size:
                self.counters["downloads_resumed"] += 1
                log.info("firmware download resumed", job=job_id, offset=have)
            try:
                if await fetch_range(art.url, path, size=art.size, on_bytes=on_bytes,
                                     ssl_ctx=self.ssl_ctx,
                                     timeout_s=self.http_timeout_s) == art.size:
                    return path
            except ArtifactError as exc:
                raise self._refuse(str(exc), exc.reason, path) from exc
            except TransportError as exc:
                log.warning("firmware download broken", job=job_id, error=str(exc),
                            attempt=attempt)
                if attempt == self.download_retries:
                    raise FirmwareError(str(exc), reason="download",
                                        retriable=True) from exc
            await self.clock.sleep(self.retry_backoff_s * (attempt + 1))
        raise FirmwareError(f"{art.url}: still short of {art.size} bytes",
                            reason="download", retriable=True)

    def _verify(self, art: FirmwareArtifact, path: Path) -> None:
        size = path.stat().st_size
        if size != art.size:
            raise self._refuse(f"got {size} bytes, job says {art.size}", "size_mismatch", path)
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != art.sha256.lower():
            raise self._refuse(f"sha256 {h.hexdigest()} != {art.sha256}", "sha256_mismatch",
                               path)
        try:
            verify(art, self.verify_key)
        except SignatureError as exc:
            raise self._refuse(f"image signature: {exc}", exc.reason, path) from exc
        self.counters["signature_verified"] += 1

    async def _run(self, cmd: list[str], art: FirmwareArtifact,
                   job_id: str) -> tuple[int, str]:
        env = {**os.environ, "PYMIGRATE_FIRMWARE_VERSION": art.version,
               "PYMIGRATE_FIRMWARE_SHA256": art.sha256, "PYMIGRATE_JOB_ID": job_id}
        proc = await asyncio.create_subprocess_exec(
            *cmd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        try:
            async with asyncio.timeout(self.cmd_timeout_s):
                out, _ = await proc.communicate()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            return -9, f"timed out after {self.cmd_timeout_s}s"
        return int(proc.returncode or 0), out.decode(errors="replace").strip()[-400:]
