"""The asyncio coordinator service: channel in, engine, timers, group-committed state.

* Device documents arrive from the channel, are decoded (malformed ones are counted and
  dropped), checked for ownership (refused ones are counted and answered with
  ``op=refused``) and applied to the engine in O(1).
* One timer task sleeps on the injected :class:`~pymigrate.clock.Clock` until the
  earliest engine deadline, or until an event makes an earlier one (no periodic scan).
* Notifications go out through a sender task; transitions, rollout changes and device
  health are written in group commits (``commit_interval_s``). On start the coordinator
  reloads registry, groups and unfinished rollouts and resumes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from typing import Any

import msgspec
import structlog

from cloud.fleet.channel import CoordinatorChannel
from cloud.fleet.core import FleetCore
from cloud.fleet.engine import DONE_STATUSES, Rollout, Wave
from cloud.fleet.metrics import FleetMetrics
from cloud.fleet.pacing import Pacer
from cloud.fleet.protocol import (
    JobNotify,
    JobResult,
    JobUpdate,
    ProtocolError,
    decode,
    encode,
)
from cloud.fleet.registry import Group, Registry
from cloud.fleet.spec import RolloutSpec, WavePlan
from cloud.fleet.states import DeviceState, FleetError, InvalidTransition, NotOwner
from cloud.fleet.store import FleetStore, RolloutRecord, TransitionRecord
from pymigrate.clock import Clock

log = structlog.get_logger("pymigrate.fleet")
PENDING = "pending"


class Control(msgspec.Struct, frozen=True):
    """Operator / ingest command received on the control topic."""

    cmd: str
    rollout_id: str = ""
    lag_s: float = 0.0
    throttled: bool = False


_CONTROL = msgspec.json.Decoder(Control)
_ENC = msgspec.json.Encoder()
_SPEC = msgspec.json.Decoder(RolloutSpec)
_PLAN = msgspec.json.Decoder(WavePlan)
_WAVES = msgspec.json.Decoder(list[Wave])


class Coordinator:
    """Fleet coordinator: registry, rollouts, job channel and state store."""

    def __init__(self, *, store: FleetStore, channel: CoordinatorChannel, clock: Clock,
                 registry: Registry | None = None, metrics: FleetMetrics | None = None,
                 commit_interval_s: float = 0.05, max_batch: int = 5000) -> None:
        self.store = store
        self.channel = channel
        self.clock = clock
        self.registry = registry or Registry()
        self.metrics = metrics or FleetMetrics()
        self.core = FleetCore(self.registry, self)
        self.commit_interval_s = commit_interval_s
        self.max_batch = max_batch
        self._pending: list[TransitionRecord] = []
        self._dirty: set[str] = set()
        self._dirty_devices: set[int] = set()
        self._out: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self._kick = asyncio.Event()
        self._flush_evt = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.rejected = 0
        self.refused = 0
        self.write_errors = 0
        self.transitions = 0
        self._flush_lock = asyncio.Lock()
        self._finished: dict[str, asyncio.Event] = {}

    def now(self) -> float:
        """Wall time in epoch seconds from the injected clock."""
        return self.clock.time_ms() / 1000.0

    # -- Effects (called synchronously by the engine) --------------------------------
    def notify(self, rollout: Rollout, idx: int, op: str, attempt: int) -> None:
        dev = self.registry.ids[idx]
        doc = rollout.spec.document  # rollback needs it too (command hooks)
        msg = JobNotify(rollout.id, dev, op, attempt, doc)  # type: ignore[arg-type]
        self._out.put_nowait((dev, encode(msg)))
        self.metrics.notifications.labels(op).inc()

    def transition(self, rollout: Rollout, idx: int, src: int, dst: int, attempt: int,
                   reason: str, now: float) -> None:
        self._dirty.add(rollout.id)
        self._pending.append(TransitionRecord(rollout.id, self.registry.ids[idx], src, dst,
                                              attempt, reason, int(now * 1000)))
        self.transitions += 1
        self.metrics.transition(dst)
        self._flush_evt.set()

    def changed(self, rollout: Rollout) -> None:
        self._dirty.add(rollout.id)
        self._flush_evt.set()
        if rollout.done:
            self._finished_event(rollout.id).set()

    def _finished_event(self, rollout_id: str) -> asyncio.Event:
        evt = self._finished.get(rollout_id)
        if evt is None:
            evt = self._finished[rollout_id] = asyncio.Event()
        return evt

    async def wait_finished(self, rollout_id: str) -> Rollout:
        """Wait until a rollout reaches a final status (completed / rolled back / cancelled)."""
        r = self.core.get(rollout_id)
        if not r.done:
            evt = self._finished_event(rollout_id)
            evt.clear()
            await evt.wait()
        return r

    # -- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        """Load persisted state, resume rollouts, start the channel and the tasks."""
        await self._load()
        await self.channel.start(self._on_message)
        for name, coro in (("timers", self._timer_loop()), ("sender", self._send_loop()),
                           ("writer", self._write_loop())):
            task = asyncio.create_task(coro, name=f"fleet[{name}]")
            self._tasks.add(task)
            task.add_done_callback(self._task_done)
        self._kick.set()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("fleet task died", task=task.get_name(), error=repr(task.exception()))

    async def stop(self) -> None:
        """Stop tasks and the channel, then write everything pending."""
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.channel.stop()
        await self.flush()

    async def __aenter__(self) -> Coordinator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _load(self) -> None:
        self.registry.load_rows(await self.store.load_devices())
        for g in await self.store.load_groups():
            self.registry.add_group(g)
        now = self.now()
        for rec in await self.store.load_rollouts():
            if rec.status == PENDING:
                continue  # started by load_pending()
            spec = _SPEC.decode(rec.spec)
            rows = await self.store.load_device_states(rec.rollout_id)
            reg = self.registry
            targets = sorted(i for i in (reg.get_index(r.device_id) for r in rows)
                             if i is not None)
            r = Rollout(spec, reg, targets, self, Pacer(spec.pacing),
                        now=rec.created_ms / 1000.0, plan=_PLAN.decode(rec.plan))
            r.finished_at = rec.finished_ms / 1000.0
            r.restore([(reg.index(x.device_id), x.state, x.attempts, x.since_ms / 1000.0)
                       for x in rows if reg.get_index(x.device_id) is not None],
                      _WAVES.decode(rec.waves), rec.status, rec.reason, now)
            self.core.rollouts[rec.rollout_id] = r
            if rec.status not in DONE_STATUSES:
                log.info("rollout resumed", rollout=rec.rollout_id, status=r.status)
        self._dirty.clear()
        self._pending.clear()

    async def load_pending(self) -> list[str]:
        """Start rollouts created offline (``pymigrate fleet create-rollout``)."""
        started = []
        for rec in await self.store.load_rollouts():
            if rec.status == PENDING and rec.rollout_id not in self.core.rollouts:
                await self.create_rollout(_SPEC.decode(rec.spec))
                started.append(rec.rollout_id)
        return started

    async def handle_control(self, payload: bytes) -> None:
        """An operator or ingest command (JSON): ``{"cmd": "load"}``,
        ``{"cmd": "pause|resume|cancel|abort", "rollout_id": ...}`` or
        ``{"cmd": "ingest", "lag_s": ..., "throttled": ...}``."""
        try:
            cmd = _CONTROL.decode(payload)
            if cmd.cmd == "load":
                await self.load_pending()
            elif cmd.cmd == "ingest":
                self.report_ingest(lag_s=cmd.lag_s, throttled=cmd.throttled)
            else:
                self._op(cmd.rollout_id, cmd.cmd)
        except (msgspec.DecodeError, FleetError) as exc:
            self.rejected += 1
            log.warning("control command rejected", error=str(exc))

    # -- registry / operator API ----------------------------------------------------
    async def add_devices(self, devices: list[tuple[str, dict[str, str]]]) -> None:
        """Register devices (persisted immediately)."""
        idxs = [self.registry.add(d, attrs) for d, attrs in devices]
        await self.store.save_devices([self.registry.row(i) for i in idxs])

    async def add_group(self, group: Group) -> None:
        """Create or replace a group (persisted immediately)."""
        self.registry.add_group(group)
        await self.store.save_group(group)

    async def create_rollout(self, spec: RolloutSpec) -> Rollout:
        """Create, persist (targets included) and start a rollout."""
        now = self.now()
        r = self.core.create(spec, now, start=False)
        await self.store.add_targets(r.id, [self.registry.ids[i] for i in r.targets],
                                     int(now * 1000))
        await self.store.save_rollout(self._record(r))
        r.start(now)
        r.dispatch(now)
        self._kick.set()
        return r

    def _op(self, rollout_id: str, op: str) -> None:
        r = self.core.get(rollout_id)
        now = self.now()
        if op == "pause":
            r.pause()
        elif op == "resume":
            r.resume(now)
        elif op == "cancel":
            r.cancel(now)
        elif op == "abort":
            r.abort(now, reason="operator_abort")
        else:
            raise FleetError(f"unknown operation {op!r}", reason="bad_op")
        r.dispatch(now)
        self._kick.set()

    def pause(self, rollout_id: str) -> None:
        """Pause a rollout."""
        self._op(rollout_id, "pause")

    def resume(self, rollout_id: str) -> None:
        """Resume a paused rollout (overrides a failed gate)."""
        self._op(rollout_id, "resume")

    def cancel(self, rollout_id: str) -> None:
        """Cancel a rollout."""
        self._op(rollout_id, "cancel")

    def abort(self, rollout_id: str) -> None:
        """Abort a rollout and roll back updated devices in waves."""
        self._op(rollout_id, "abort")

    def report_ingest(self, *, lag_s: float = 0.0, throttled: bool = False) -> None:
        """Back-pressure from the cloud ingest (slows notifications and waves)."""
        self.core.report_ingest(self.now(), lag_s=lag_s, throttled=throttled)

    def status(self) -> dict[str, Any]:
        """Fleet health plus per-rollout progress (also refreshes the gauges)."""
        now = self.now()
        summary = self.registry.summary()
        self.metrics.online.set(summary.online)
        self.metrics.backlog.set(summary.backlog_bytes)
        rollouts = []
        for r in self.core.rollouts.values():
            self.metrics.set_states(r.id, r.counts)
            rollouts.append(r.progress(now))
        return {"fleet": msgspec.to_builtins(summary), "rollouts": rollouts,
                "documents_rejected": self.rejected, "documents_refused": self.refused,
                "transitions": self.transitions}

    # -- device documents -----------------------------------------------------------
    async def _on_message(self, device_id: str, kind: str, payload: bytes) -> None:
        try:
            msg = decode(kind, payload)
        except ProtocolError as exc:
            self.rejected += 1
            self.metrics.rejected.labels(exc.reason).inc()
            log.warning("job document rejected", device=device_id, kind=kind,
                        reason=exc.reason)
            return
        try:
            self.core.handle(device_id, msg, self.now())
        except NotOwner as exc:
            self.refused += 1
            self.metrics.refused.inc()
            job = getattr(msg, "job_id", None) or ""
            log.warning("job document refused", device=device_id, job=job, error=str(exc))
            refusal = JobNotify(job, device_id, "refused", reason="not_owner")
            self._out.put_nowait((device_id, encode(refusal)))
            return
        except InvalidTransition as exc:  # pragma: no cover - engine guards its own states
            self.metrics.invalid_transitions.inc()
            log.error("invalid transition", error=str(exc))
            return
        if isinstance(msg, JobUpdate | JobResult) and msg.health is not None:
            idx = self.registry.get_index(device_id)
            if idx is not None:
                self._dirty_devices.add(idx)
                self._flush_evt.set()
        self._kick.set()

    # -- tasks ----------------------------------------------------------------------
    async def _timer_loop(self) -> None:
        while True:
            self._kick.clear()
            now = self.now()
            self.core.tick(now)
            deadline = self.core.next_deadline()
            if math.isinf(deadline):
                await self._kick.wait()
                continue
            mono = self.clock.monotonic() + max(0.0, deadline - now)
            sleeper = asyncio.ensure_future(self.clock.sleep_until(mono))
            kicker = asyncio.ensure_future(self._kick.wait())
            try:
                await asyncio.wait({sleeper, kicker}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleeper.cancel()
                kicker.cancel()

    async def _send_loop(self) -> None:
        while True:
            dev, payload = await self._out.get()
            try:
                await self.channel.send(dev, "notify", payload)
            except Exception as exc:  # a failed send is retried via timeout / pull
                log.warning("notify send failed", device=dev, error=repr(exc))
            finally:
                self._out.task_done()

    async def _write_loop(self) -> None:
        backoff = self.commit_interval_s
        while True:
            await self._flush_evt.wait()
            await self.clock.sleep(backoff)  # group-commit window (longer after errors)
            try:
                await self.flush()
                backoff = self.commit_interval_s
            except Exception as exc:  # keep the records, retry: never drop a transition
                self.write_errors += 1
                backoff = min(max(backoff * 2, 0.5), 30.0)
                log.error("fleet state write failed", error=repr(exc), retry_s=backoff)

    def _record(self, r: Rollout) -> RolloutRecord:
        return RolloutRecord(
            r.id, _ENC.encode(r.spec).decode(), _ENC.encode(r.plan).decode(), r.status,
            r.reason, _ENC.encode(r.waves).decode(), int(r.created_at * 1000),
            self.clock.time_ms(), int(r.finished_at * 1000))

    async def flush(self) -> None:
        """Write pending transitions, changed rollouts and device health now."""
        async with self._flush_lock:
            self._flush_evt.clear()
            recs, self._pending = self._pending, []
            dirty, self._dirty = self._dirty, set()
            devs, self._dirty_devices = self._dirty_devices, set()
            for rid in dirty:  # keep the exported gauges current without a scan
                self.metrics.set_states(rid, self.core.rollouts[rid].counts)
            try:
                await self.store.save_transitions(recs)
                recs = []
                for rid in list(dirty):
                    await self.store.save_rollout(self._record(self.core.rollouts[rid]))
                    dirty.discard(rid)
                if devs:
                    await self.store.save_devices([self.registry.row(i) for i in devs])
                    devs = set()
            except BaseException:
                self._pending[:0] = recs
                self._dirty |= dirty
                self._dirty_devices |= devs
                self._flush_evt.set()
                raise

    async def drain(self) -> None:
        """Wait until queued notifications were handed to the channel (tests, shutdown)."""
        await self._out.join()


def state_name(state: int) -> str:
    """Lower-case name of a device state."""
    return DeviceState(state).name.lower()
