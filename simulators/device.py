"""A constrained device: the real agent with a storage quota, a battery and a clock of its own.

* **Storage quota** (:class:`StorageQuota`): a disk that holds only the state directory,
  ``quota_bytes`` for every file in it (database, WAL, sidecars, ballast). The agent sees
  it as ``statvfs`` would show such a disk (free = quota - the directory's files), and the
  database cannot outgrow it (SQLite ``max_page_count``: past it a write fails with
  ``SQLITE_FULL``, as ENOSPC would). The directory's size is measured at every free-space
  probe (each group commit) and every sample, and its peak reported, so the quota is
  checked, not assumed.
* **Memory budget**: measured with :mod:`tracemalloc` by the fleet runner (Python heap;
  SQLite's page cache is fixed by ``buffer.cache_kib`` and reported alongside).
* **CPU time per stage**: :class:`simulators.driver.CpuMeter` (per device and task).
* **Battery** (:class:`Battery`): idle drain plus a cost per radio wake-up and per byte
  sent; its level is fed back to the agent's power state (``PowerState.update``), so a
  battery profile reacts as on hardware.
* **Clock** (:class:`DeviceClock`): a view of the simulation clock with its own wall-clock
  offset, drift and jumps (RTC reset to 1970, steps back), for the clock-failure cases.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.config import AgentConfig
from agent.supervisor import Agent
from pymigrate.clock import VirtualClock
from simulators.driver import current_device
from simulators.sensors import Generator
from transports.base import Uplink

__all__ = ["Battery", "DeviceClock", "SimDevice", "StorageQuota", "dir_bytes"]


def dir_bytes(path: Path) -> int:
    """Bytes of the regular files directly in ``path`` (the agent's state directory)."""
    total = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir(path):
            if entry.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    total += entry.stat(follow_symlinks=False).st_size
    return total


class DeviceClock:
    """The simulation clock as one device sees it: monotonic time and sleeping are
    shared; wall time has this device's offset and drift (ppm), and can jump."""

    def __init__(self, base: VirtualClock, *, offset_ms: int = 0, drift_ppm: float = 0.0) -> None:
        self.base = base
        self.offset_ms = offset_ms
        self.drift_ppm = drift_ppm

    def time_ms(self) -> int:
        t = self.base.monotonic()
        return self.base.true_time_ms() + self.offset_ms + round(t * self.drift_ppm / 1000.0)

    def true_time_ms(self) -> int:
        return self.base.true_time_ms()

    def monotonic(self) -> float:
        return self.base.monotonic()

    async def sleep(self, seconds: float) -> None:
        await self.base.sleep(seconds)

    async def sleep_until(self, deadline: float) -> None:
        await self.base.sleep_until(deadline)

    def jump_to(self, wall_ms: int) -> None:
        """The RTC now reads ``wall_ms`` (e.g. 0 after a reset to 1970)."""
        self.offset_ms += wall_ms - self.time_ms()


class Battery:
    """Energy in millijoules: idle drain, a radio wake-up per send, a cost per byte."""

    def __init__(self, capacity_mj: float = 20_000_000.0, *, idle_mw: float = 5.0,
                 wake_mj: float = 500.0, per_byte_mj: float = 0.005) -> None:
        self.capacity_mj = capacity_mj
        self.used_mj = 0.0
        self.idle_mw = idle_mw
        self.wake_mj = wake_mj
        self.per_byte_mj = per_byte_mj
        self._t = 0.0
        self.sends = 0
        self.radio_mj = 0.0

    def idle_until(self, t: float) -> None:
        if t > self._t:
            self.used_mj += (t - self._t) * self.idle_mw
            self._t = t

    def send(self, t: float, wire_bytes: int) -> None:
        self.idle_until(t)
        cost = self.wake_mj + wire_bytes * self.per_byte_mj
        self.used_mj += cost
        self.radio_mj += cost
        self.sends += 1

    @property
    def pct(self) -> float:
        return max(0.0, 100.0 * (1.0 - self.used_mj / self.capacity_mj))


class StorageQuota:
    """A disk holding only the device's state directory, ``quota_bytes`` for all its files.

    * What the agent sees: :meth:`install` gives the buffer :meth:`free` as its free-space
      probe (``DurableBuffer.watch_disk``, in place of ``statvfs``) before the buffer
      opens, so every decision (ballast, eviction) counts the WAL and the sidecars.
    * What stops a write: :meth:`apply` caps the database file at the whole disk (SQLite
      ``max_page_count``; writes past it fail with ``SQLITE_FULL``, as ENOSPC would).
      SQLite has no hook on its WAL writes: the WAL is held to the disk by the buffer's
      own accounting, and :meth:`measure` checks that (sizes as ``st_size``).
    """

    PAGE = 4096

    def __init__(self, quota_bytes: int | None) -> None:
        self.quota_bytes = quota_bytes
        self.peak_dir_bytes = 0
        self._dir: Path | None = None

    def install(self, agent: Agent, data_dir: Path) -> None:
        """Before the agent starts: its buffer sees this disk's free space."""
        if self.quota_bytes is None:
            return
        self._dir = data_dir
        agent.buffer.watch_disk(self.free)

    def free(self, _path: Path) -> int:
        """What ``statvfs`` would report free on this disk (the buffer's probe: it runs
        at each group commit, in a worker thread)."""
        assert self.quota_bytes is not None and self._dir is not None
        return max(0, self.quota_bytes - self.measure(self._dir))

    async def apply(self, agent: Agent) -> None:
        """Cap the buffer database at the disk (SQLite refuses to grow it further)."""
        if self.quota_bytes is None:
            return
        # the buffer's connection is private; a page limit is the one knob SQLite offers
        # to refuse writes before the real disk does (max_page_count is per connection)
        db = agent.buffer._db
        if db is None:
            raise RuntimeError("buffer not open")
        pages = max(16, self.quota_bytes // self.PAGE)
        await db.execute(f"PRAGMA max_page_count = {pages}")

    def measure(self, path: Path) -> int:
        n = dir_bytes(path)
        self.peak_dir_bytes = max(self.peak_dir_bytes, n)
        return n


class SimDevice:
    """One simulated gateway: the real :class:`Agent` over a generator and an uplink.

    ``start()`` runs the agent in its own task (tagged with the device id for CPU
    accounting); ``restart()`` stops it gracefully and starts a new agent on the same
    state directory (a firmware update or power cycle); counters survive restarts.
    """

    def __init__(self, config: AgentConfig, *, clock: DeviceClock,
                 generators: list[Generator], uplink: Uplink, group: str = "default",
                 quota: StorageQuota | None = None, battery: Battery | None = None,
                 on_event: Callable[[str, str, dict[str, Any]], None] | None = None) -> None:
        self.config = config
        self.id = config.device.id
        self.clock = clock
        self.generators = generators
        self.uplink = uplink
        self.group = group
        self.quota = quota or StorageQuota(None)
        self.battery = battery
        self._on_event = on_event
        self.agent: Agent | None = None
        self.task: asyncio.Task[None] | None = None
        self.incarnations = 0
        self.totals: Counter[str] = Counter()  # summed over finished incarnations
        self.evicted: Counter[str] = Counter()  # "reason:priority" -> readings
        self.quarantined = 0
        self.peak_buffer_bytes = 0  # buffer database + WAL on disk
        self.peak_payload_bytes = 0  # compressed chunk payload held
        self.still_buffered = 0  # readings left in the buffer when last stopped
        self.data_dir = Path(config.device.data_dir)

    def _event(self, name: str, data: dict[str, Any]) -> None:
        if name == "evicted":
            self.evicted[f"{data['reason']}:{data['priority']}"] += int(data["readings"])
        elif name == "quarantined":
            self.quarantined += 1
        if self._on_event is not None:
            self._on_event(self.id, name, data)

    async def start(self) -> None:
        """Start a new agent incarnation and wait until its stages run."""
        self.agent = Agent(self.config, clock=self.clock, uplinks=[self.uplink],
                           sources=list(self.generators), on_event=self._event)
        self.quota.install(self.agent, self.data_dir)
        self.incarnations += 1
        token = current_device.set(self.id)
        try:
            self.task = asyncio.create_task(self.agent.run(), name=f"device[{self.id}]")
        finally:
            current_device.reset(token)
        started = asyncio.ensure_future(self.agent.started.wait())
        await asyncio.wait({started, self.task}, return_when=asyncio.FIRST_COMPLETED)
        if self.task.done():
            started.cancel()
            self.task.result()  # raises the start failure
        await self.quota.apply(self.agent)

    @staticmethod
    def _counts(agent: Agent) -> Counter[str]:
        st = agent.status()
        up = agent.uploader.stats()
        out: Counter[str] = Counter({k: int(st[k]) for k in (
            "received", "accepted", "duplicates_dropped", "delivered")})
        out["rejected"] = sum(st["rejected"].values())
        out["dead_lettered"] = int(up["readings_dead_lettered"])
        for k in ("batches_throttled", "batches_failed", "wakeups"):
            out[k] = int(up[k])
        return out

    def _fold(self) -> None:
        """Add the finished incarnation's counters to the totals."""
        if self.agent is not None:
            self.totals.update(self._counts(self.agent))

    def live(self) -> dict[str, int]:
        """Totals including the running incarnation."""
        out = Counter(self.totals)
        if self.agent is not None and self.task is not None and not self.task.done():
            out.update(self._counts(self.agent))
        return dict(out)

    def sample(self) -> tuple[int, int]:
        """(buffered payload bytes, pending readings); updates the peaks and battery."""
        if self.agent is None or self.task is None or self.task.done():
            return 0, 0
        st = self.agent.buffer.stats()
        self.peak_buffer_bytes = max(self.peak_buffer_bytes, st.bytes_on_disk)
        self.peak_payload_bytes = max(self.peak_payload_bytes, st.payload_bytes)
        self.quota.measure(self.data_dir)
        if self.battery is not None:
            self.battery.idle_until(self.clock.monotonic())
            self.agent.uploader.power.update(battery_pct=round(self.battery.pct, 1))
        return st.payload_bytes, sum(st.readings_pending.values())

    def stop_sources(self) -> None:
        for g in self.generators:
            g.done = True

    async def stop(self, *, crash: bool = False) -> None:
        """Stop the agent gracefully (``crash``: cancel it, as a power cut would)."""
        if self.agent is None or self.task is None:
            return
        if not self.task.done():
            if crash:
                self.agent.force_stop()
            else:
                self.agent.request_stop()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        if not self.task.cancelled():
            self.task.result()
        self._fold()
        self.still_buffered = self._count("SELECT coalesce(sum(count), 0) FROM chunks")
        self.agent = None
        self.task = None

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    def buffer_path(self) -> Path:
        return self.config.data_path(self.config.buffer.path)

    def _count(self, sql: str) -> int:
        path = self.buffer_path()
        if not path.exists():
            return 0
        con = sqlite3.connect(path)
        try:
            row = con.execute(sql).fetchone()
        except sqlite3.Error:
            return 0
        finally:
            con.close()
        return int(row[0])

    def quarantined_readings(self) -> int:
        """Readings in chunks the buffer quarantined (checksum failures), from its file."""
        return self._count("SELECT coalesce(sum(count), 0) FROM quarantine")
