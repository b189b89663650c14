"""systemd's notify protocol by hand: one datagram per state change on ``$NOTIFY_SOCKET``.

``READY=1`` once every stage runs, ``WATCHDOG=1`` every ``WATCHDOG_USEC / 2`` but only
while every stage task is alive (a dead or wedged stage lets systemd's watchdog fire and
restart the unit), ``STOPPING=1`` when a graceful stop begins, ``STATUS=...`` for
``systemctl status``. Abstract-namespace sockets (``@name``) are supported. Without
``NOTIFY_SOCKET`` (not under systemd) every call is a no-op.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog

__all__ = ["Notifier"]

log = structlog.get_logger("pymigrate.agent.sdnotify")


class Notifier:
    """Sends sd_notify messages; ``watchdog_s`` is the systemd watchdog timeout (or None)."""

    def __init__(self, address: str | None, *, watchdog_s: float | None = None,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> None:
        self.address = address
        self.watchdog_s = watchdog_s
        self._sleep = sleep
        self.sent: list[str] = []  # what was sent (for tests and status)
        self.errors = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` (systemd's names)."""
        env = os.environ if env is None else env
        addr = env.get("NOTIFY_SOCKET") or None
        watchdog_s: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            watchdog_s = int(usec) / 1e6
        return cls(addr, watchdog_s=watchdog_s)

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, *lines: str) -> bool:
        """Send one datagram with ``lines``; False (logged, counted) when it failed."""
        if not self.address:
            return False
        addr = self.address
        if addr.startswith("@"):
            addr = "\0" + addr[1:]  # abstract namespace
        msg = "\n".join(lines)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.setblocking(False)  # a full receiver queue must never stall the event loop
                s.connect(addr)
                s.send(msg.encode())
        except OSError as exc:  # systemd gone or socket misconfigured: never fatal
            self.errors += 1
            if self.errors <= 3:
                log.warning("sd_notify failed", socket=self.address, error=str(exc))
            return False
        self.sent.append(msg)
        return True

    def ready(self, status: str = "running") -> bool:
        return self.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def stopping(self, status: str = "stopping: draining", *,
                 extend_s: float | None = None) -> bool:
        """``STOPPING=1``; with ``extend_s`` also ``EXTEND_TIMEOUT_USEC`` so a drain
        deadline longer than the unit's ``TimeoutStopSec`` is not cut short."""
        extra = [f"EXTEND_TIMEOUT_USEC={int(extend_s * 1e6)}"] if extend_s else []
        return self.notify("STOPPING=1", f"STATUS={status}", *extra)

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def watchdog(self, status: str | None = None) -> bool:
        return self.notify("WATCHDOG=1", *([f"STATUS={status}"] if status else []))

    async def run(self, alive: Callable[[], Mapping[str, bool]], *, stop: asyncio.Event,
                  status: Callable[[], str] | None = None,
                  stop_extend_s: float | None = None) -> None:
        """The supervisor's notify task: READY now, WATCHDOG at half the timeout while every
        stage in ``alive()`` is alive, STOPPING (asking for ``stop_extend_s`` more) when
        ``stop`` is set; then return."""
        self.ready(status() if status else "running")
        stopper = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                if self.watchdog_s is None:
                    await stopper
                    break
                ticker = asyncio.ensure_future(self._sleep(self.watchdog_s / 2))
                try:
                    await asyncio.wait({stopper, ticker}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    ticker.cancel()
                if stop.is_set():
                    break
                stages = alive()
                dead = [name for name, ok in stages.items() if not ok]
                if stages and not dead:
                    self.watchdog(status() if status is not None else None)
                else:
                    log.error("watchdog withheld: stage not alive", stages=dead)
        finally:
            stopper.cancel()
        self.stopping(extend_s=stop_extend_s)
