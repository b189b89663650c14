"""Real processes for the chaos and peer benchmarks: Mosquitto instances we own (so we can
restart them), ``pymigrate`` agent/cloud subprocesses with logs, and small waits.

Loopback only. Every process started here is stopped by its owner (by pid, never by name).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.3):
            return True
    except OSError:
        return False


async def wait_until(pred: object, limit_s: float, step: float = 0.1) -> bool:
    """Wait (bounded) until ``pred()`` is true; the harness's only polling helper."""
    assert callable(pred)
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        if pred():
            return True
        await asyncio.sleep(step)
    return bool(pred())


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a live process from /proc (0.0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def reap(p: subprocess.Popen[bytes], limit_s: float) -> float | None:
    """Wait for ``p`` to exit (bounded) and return its CPU seconds (rusage), or None on
    timeout. Sets ``p.returncode``."""
    end = time.monotonic() + limit_s
    while True:
        try:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)  # noqa: ASYNC222 - WNOHANG
        except ChildProcessError:  # already reaped elsewhere
            return 0.0
        if pid:
            p.returncode = os.waitstatus_to_exitcode(status)
            return float(ru.ru_utime + ru.ru_stime)
        if time.monotonic() >= end:
            return None
        await asyncio.sleep(0.02)


async def stop_process(p: subprocess.Popen[bytes], sig: int, limit_s: float) -> float:
    """Signal ``p`` and reap it (SIGKILL after ``limit_s``); returns its CPU seconds."""
    if p.returncode is None:
        p.send_signal(sig)
    cpu = await reap(p, limit_s)
    if cpu is None:
        p.kill()
        cpu = await reap(p, 10) or 0.0
    return cpu


class Mosquitto:
    """A Mosquitto broker on a loopback port, with its own config, store and log."""

    def __init__(self, workdir: Path, name: str, port: int | None = None, *,
                 persistence: bool = True, extra: str = "", max_queued: int = 0,
                 autosave_s: int = 1) -> None:
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.port = port or free_port()
        self.persistence = persistence
        self.extra = extra  # appended last (bridge ``connection`` blocks go there)
        self.max_queued = max_queued
        self.autosave_s = autosave_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.cpu_s = 0.0

    def conf_text(self) -> str:
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true",
                 f"max_queued_messages {self.max_queued}", "max_inflight_messages 20",
                 f"log_dest file {self.dir / 'mosquitto.log'}",
                 "log_type error", "log_type warning", "log_type notice"]
        if os.geteuid() == 0:  # mosquitto drops to user 'mosquitto' otherwise: our dirs
            lines.append("user root")
        if self.persistence:
            lines += ["persistence true", f"persistence_location {self.dir}/",
                      f"autosave_interval {self.autosave_s}"]
        return "\n".join(lines) + "\n" + self.extra

    async def start(self) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        conf = self.dir / "mosquitto.conf"
        conf.write_text(self.conf_text())
        self.proc = subprocess.Popen([exe, "-c", str(conf)],  # noqa: ASYNC220 stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        if not await wait_until(lambda: port_open(self.port), 10):
            raise RuntimeError(f"mosquitto {self.name} did not listen on {self.port}")

    async def stop(self, *, kill: bool = False) -> None:
        p = self.proc
        if p is None:
            return
        self.cpu_s += await stop_process(p, signal.SIGKILL if kill else signal.SIGTERM, 10)
        self.proc = None

    async def restart(self, *, kill: bool = False, down_s: float = 1.0) -> None:
        await self.stop(kill=kill)
        await asyncio.sleep(down_s)
        await self.start()
        self.restarts += 1

    def disk_bytes(self) -> int:
        db = self.dir / "mosquitto.db"
        return db.stat().st_size if db.exists() else 0


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


class Proc:
    """A ``pymigrate`` subprocess (agent or cloud) whose output is appended to a log file."""

    def __init__(self, args: list[str], log_path: Path, *, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.args = args
        self.log_path = log_path
        self.env = dict(env or {})
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.starts = 0
        self.cpu_s = 0.0  # accumulated over finished incarnations

    @property
    def alive(self) -> bool:
        if self.proc is None or self.proc.returncode is not None:
            return False
        return Path(f"/proc/{self.proc.pid}").exists() and not _zombie(self.proc.pid)

    def start(self) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in _reap
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen([PY, "-m", "pymigrate.cli", *self.args], stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env, cwd=self.cwd)
        self.starts += 1

    def cpu_now(self) -> float:
        """CPU seconds of every incarnation so far (the live one sampled now)."""
        live = proc_cpu_seconds(self.proc.pid) if self.alive and self.proc else 0.0
        return self.cpu_s + live

    def _reap(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        self.proc = None

    async def kill9(self) -> None:
        if self.proc is None:
            return
        self.cpu_s += await stop_process(self.proc, signal.SIGKILL, 10)
        self._reap()

    async def terminate(self, limit_s: float = 30.0) -> int | None:
        """Graceful stop (SIGTERM), SIGKILL after ``limit_s``; returns the exit code."""
        if self.proc is None:
            return None
        p = self.proc
        self.cpu_s += await stop_process(p, signal.SIGTERM, limit_s)
        rc = p.returncode
        self._reap()
        return rc


def proc_rss_bytes(pid: int) -> int:
    """Resident set size of a live process from /proc (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def mount_tmpfs(path: Path, size_bytes: int) -> str | None:
    """Mount a tmpfs of ``size_bytes`` on ``path`` (a real filesystem that fills up).
    Returns None when mounted, else the reason it cannot be (not root, no mount)."""
    if os.geteuid() != 0:
        return "not root: cannot mount a tmpfs (the full-filesystem fault is skipped)"
    path.mkdir(parents=True, exist_ok=True)
    exe = shutil.which("mount")
    if exe is None:
        return "no mount(8)"
    r = subprocess.run([exe, "-t", "tmpfs", "-o", f"size={size_bytes},mode=0755", "tmpfs",
                        str(path)], capture_output=True, text=True, timeout=10, check=False)
    if r.returncode != 0:
        return f"mount tmpfs failed: {r.stderr.strip()[:200]}"
    return None


def umount(path: Path) -> None:
    exe = shutil.which("umount")
    if exe is not None:
        subprocess.run([exe, str(path)], capture_output=True, timeout=30, check=False)
