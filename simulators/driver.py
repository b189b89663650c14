"""Drive virtual time through real asyncio code that also talks to threads.

The agent's stages sleep on an injected :class:`~pymigrate.clock.VirtualClock`, but the
durable buffer and the cloud store run SQLite in aiosqlite's worker threads (and the
buffer's sequence sidecar in the default executor). A driver that advances time after a
few ``asyncio.sleep(0)`` would jump past a commit that is still running in a thread, and
the run would depend on thread scheduling. :class:`TimeDriver` therefore advances time
only when the program is *quiescent*:

* no thread work is pending: :class:`ThreadTracker` counts aiosqlite requests (by
  wrapping ``aiosqlite.Connection._execute``, ``_connect`` and ``stop`` for the duration
  of the run) and executor jobs (``loop.run_in_executor``, which ``asyncio.to_thread``
  uses), and wakes the driver on an event when the count drops to zero (no polling);
* the event loop's ready queue is empty for two consecutive passes (every task is
  blocked on a clock sleeper, a queue, an event or that thread work).

Then it moves the clock to the next sleeper's deadline (never further), wakes exactly
the sleepers due then, and waits for quiescence again. Runs are deterministic for a
seed: the same virtual instants, the same order of work.

:class:`CpuMeter` accounts CPU time per task name (and per simulated device through a
context variable) by timing each step of every task's coroutine on the loop thread.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import time
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any

import aiosqlite
import structlog

from pymigrate.clock import VirtualClock

__all__ = ["CpuMeter", "ThreadTracker", "TimeDriver", "current_device", "stage_of"]

log = structlog.get_logger("pymigrate.sim")

#: the simulated device a task belongs to (inherited by the tasks it creates)
current_device: contextvars.ContextVar[str] = contextvars.ContextVar("sim_device", default="")


class ThreadTracker:
    """Counts thread work the loop is waiting for (aiosqlite requests, executor jobs)."""

    def __init__(self) -> None:
        self.pending = 0
        self.total = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._orig: Any = None
        self._orig_stop: Any = None
        self._orig_connect: Any = None
        self._patched_loop = False
        self.loop: asyncio.AbstractEventLoop = asyncio.get_running_loop()

    def _begin(self) -> None:
        self.pending += 1
        self.total += 1
        self._idle.clear()

    def _end(self) -> None:
        self.pending -= 1
        if self.pending <= 0:
            self.pending = 0
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def install(self) -> None:
        """Start counting (patches aiosqlite for the duration; see :meth:`uninstall`)."""
        orig: Any = aiosqlite.Connection._execute
        self._orig = orig
        tracker = self

        async def _execute(conn: aiosqlite.Connection, fn: Any, *args: Any,
                           **kwargs: Any) -> Any:
            tracker._begin()
            try:
                return await orig(conn, fn, *args, **kwargs)
            finally:
                tracker._end()

        aiosqlite.Connection._execute = _execute  # type: ignore[method-assign, assignment]
        orig_connect: Any = aiosqlite.Connection._connect
        self._orig_connect = orig_connect

        async def _connect(conn: aiosqlite.Connection) -> Any:
            tracker._begin()
            try:
                return await orig_connect(conn)
            finally:
                tracker._end()

        aiosqlite.Connection._connect = _connect  # type: ignore[method-assign, assignment]
        orig_stop: Any = aiosqlite.Connection.stop
        self._orig_stop = orig_stop

        def stop(conn: aiosqlite.Connection) -> Any:
            # close() awaits the worker thread's stop future outside _execute
            fut = orig_stop(conn)
            if fut is not None:
                tracker._begin()
                fut.add_done_callback(lambda _f: tracker._end())
            return fut

        aiosqlite.Connection.stop = stop  # type: ignore[method-assign, assignment]
        loop = self.loop
        orig_rie = loop.run_in_executor

        def run_in_executor(executor: Any, func: Any, *args: Any) -> asyncio.Future[Any]:
            fut = orig_rie(executor, func, *args)
            tracker._begin()
            # added before the awaiting task's own callback: when this one runs, the
            # task's wake-up is already in the ready queue
            fut.add_done_callback(lambda _f: tracker._end())
            return fut

        loop.run_in_executor = run_in_executor  # type: ignore[method-assign, assignment]
        self._patched_loop = True

    def uninstall(self) -> None:
        if self._orig is not None:
            aiosqlite.Connection._execute = self._orig  # type: ignore[method-assign]
            aiosqlite.Connection.stop = self._orig_stop  # type: ignore[method-assign]
            aiosqlite.Connection._connect = self._orig_connect  # type: ignore[method-assign]
            self._orig = None
        if self._patched_loop:
            del self.loop.run_in_executor
            self._patched_loop = False


def stage_of(task_name: str) -> str:
    """``agent[uploader:sim:dev-1-5-a1-3]`` -> ``uploader``; ``buffer[writer]`` -> ``buffer``."""
    head, _, rest = task_name.partition("[")
    if not rest:
        return "other"
    inner = rest.rstrip("]").split(":", 1)[0]
    if head == "agent":
        return {"ingest-append": "buffer", "uploader-drain": "uploader"}.get(inner, inner)
    return head


class _Timed(Coroutine[Any, Any, Any]):
    """A coroutine wrapper that adds the CPU time of each step to a meter."""

    __slots__ = ("_coro", "_key", "_meter")

    def __init__(self, coro: Coroutine[Any, Any, Any], meter: CpuMeter) -> None:
        self._coro = coro
        self._meter = meter
        self._key: tuple[str, str] | None = None

    def _account(self, t0: float) -> None:
        if self._key is None:
            task = asyncio.current_task()
            name = task.get_name() if task is not None else "?"
            self._key = (current_device.get(), stage_of(name))
        self._meter.cpu[self._key] += time.thread_time() - t0

    def send(self, value: Any) -> Any:
        t0 = time.thread_time()
        try:
            return self._coro.send(value)
        finally:
            self._account(t0)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        t0 = time.thread_time()
        try:
            if val is None and tb is None:
                return self._coro.throw(typ)
            return self._coro.throw(typ, val, tb)  # pragma: no cover - legacy signature
        finally:
            self._account(t0)

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, None, Any]:  # pragma: no cover - tasks use send
        return self._coro.__await__()


class CpuMeter:
    """CPU seconds of the loop thread per (device, stage), from a task factory."""

    def __init__(self) -> None:
        self.cpu: dict[tuple[str, str], float] = collections.defaultdict(float)
        self._t0_process = 0.0
        self._t0_thread = 0.0
        self.process_s = 0.0
        self.loop_thread_s = 0.0

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        meter = self

        def factory(lp: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
            return asyncio.Task(_Timed(coro, meter), loop=lp, **kw)

        loop.set_task_factory(factory)
        self._t0_process = time.process_time()
        self._t0_thread = time.thread_time()

    def uninstall(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.set_task_factory(None)
        self.process_s = time.process_time() - self._t0_process
        self.loop_thread_s = time.thread_time() - self._t0_thread

    def by_stage(self, device: str | None = None) -> dict[str, float]:
        """CPU seconds per stage (all devices, or one); ``sqlite-threads`` is the CPU
        spent outside the loop thread (SQLite in aiosqlite/executor threads)."""
        out: dict[str, float] = collections.defaultdict(float)
        for (dev, stage), s in self.cpu.items():
            if device is None or dev == device:
                out[stage] += s
        if device is None and self.process_s:
            out["sqlite-threads"] = max(0.0, self.process_s - self.loop_thread_s)
        return {k: round(v, 4) for k, v in sorted(out.items())}


class TimeDriver:
    """Advance a VirtualClock only when the program is quiescent (see module docs)."""

    def __init__(self, clock: VirtualClock, *, idle_passes: int = 2) -> None:
        self.clock = clock
        self.idle_passes = idle_passes
        self.tracker: ThreadTracker | None = None
        self.steps = 0
        self.spins = 0  # quiescence not reached after spin_limit passes (busy loops)
        self.spin_limit = 20_000

    def start(self) -> None:
        self.tracker = ThreadTracker()
        self.tracker.install()

    def stop(self) -> None:
        if self.tracker is not None:
            self.tracker.uninstall()
            self.tracker = None

    async def quiesce(self) -> None:
        """Return once no task is runnable and no thread work is pending."""
        loop = asyncio.get_running_loop()
        idle = 0
        busy = 0
        while idle < self.idle_passes:
            await asyncio.sleep(0)
            if self.tracker is not None and self.tracker.pending:
                await self.tracker.wait_idle()
                idle = 0
                continue
            # the loop's ready queue is private API; no public way to ask "anything runnable?"
            ready = getattr(loop, "_ready", ())
            if len(ready) > 0:
                idle = 0
                busy += 1
                if busy >= self.spin_limit:
                    # something re-schedules itself without sleeping on the clock (a busy
                    # loop): count it and let time move, or virtual time would stall
                    self.spins += 1
                    if self.spins <= 3:
                        log.warning("sim.busy_loop", ready=[repr(h)[:160] for h in ready][:4])
                    return
                continue
            idle += 1

    async def run_until(self, t_end: float,
                        on_step: Callable[[float], Awaitable[None] | None] | None = None,
                        *, until: Callable[[], bool] | None = None) -> bool:
        """Advance to monotonic ``t_end`` one deadline at a time; ``on_step(now)`` runs
        after each quiescent point. Returns early (True) once ``until()`` holds."""
        clock = self.clock
        while True:
            await self.quiesce()
            if on_step is not None:
                res = on_step(clock.monotonic())
                if res is not None:
                    await res
                    await self.quiesce()
            if until is not None and until():
                return True
            now = clock.monotonic()
            if now >= t_end:
                return False
            nxt = clock.next_deadline()
            step_to = t_end if nxt is None else min(max(nxt, now), t_end)
            self.steps += 1
            await clock.advance(step_to - now)
