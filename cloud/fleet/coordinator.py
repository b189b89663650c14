"""The asyncio coordinator service: channel in, engine, timers, crash-safe state.

* It becomes active only once it holds the store's lease (see :mod:`cloud.fleet.store`):
  a standby replica waits in :meth:`Coordinator.start`. Every write carries the fencing
  token; if the lease is lost the coordinator fails (:attr:`Coordinator.failed`) and the
  process exits non-zero instead of acting on stale leadership.
* Device documents arrive from the channel, are decoded (malformed ones are counted and
  dropped), checked for ownership (refused ones are counted and answered with
  ``op=refused``) and applied to the engine in O(1). A channel that supports it acks a
  device message to the broker only after the commit that holds its effects, so a crash
  makes the broker redeliver it.
* One timer task sleeps on the injected :class:`~pymigrate.clock.Clock` until the
  earliest engine deadline, or until an event makes an earlier one (no periodic scan).
* Durable before heard: transitions, rollout changes, device health, progress and the
  notifications they cause are written in one group commit (``commit_interval_s``); the
  notifications go to the sender only after that commit (the outbox). The sender claims
  a batch of outbox rows, then publishes it: at most one delivery per (job, attempt), a
  loss in the crash window is recovered by the device timeout or the device's pull.
* Notifications are signed (Ed25519) when a signing key is given; control commands are
  accepted only signed by the configured control key (or with ``insecure_control``).
"""

from __future__ import annotations

import asyncio
import math
import os
import socket
import uuid
from collections import OrderedDict
from typing import Any

import msgspec
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cloud.fleet.channel import CoordinatorChannel
from cloud.fleet.core import FleetCore
from cloud.fleet.engine import DONE_STATUSES, Rollout, Wave
from cloud.fleet.metrics import FleetMetrics
from cloud.fleet.pacing import Pacer
from cloud.fleet.protocol import (
    Health,
    JobNotify,
    JobResult,
    JobUpdate,
    ProtocolError,
    decode,
    encode,
)
from cloud.fleet.registry import Group, Registry
from cloud.fleet.service import Supervised, cancel_all
from cloud.fleet.spec import RolloutSpec, WavePlan
from cloud.fleet.states import DeviceState, FleetError, InvalidTransition, NotOwner
from cloud.fleet.store import (
    Batch,
    FleetStore,
    LeaseLost,
    OutboxRecord,
    RolloutRecord,
    TransitionRecord,
)
from pymigrate.clock import Clock
from transports.jobs_security import SignatureError, sign, verify

log = structlog.get_logger("pymigrate.fleet")
PENDING = "pending"
CONTROL_MAX_SKEW_S = 300.0  # a signed control command older or newer than this is refused
SEND_CHUNK = 16  # notifications claimed and published together (< MQTT max in flight, 20)
#: unacked device messages that end the group-commit window early: the broker sends a
#: client only so many unacked QoS 1 messages (Mosquitto max_inflight_messages, 20)
ACK_EARLY = 16


class Control(msgspec.Struct, frozen=True):
    """Operator / ingest command received on the control topic; signed by the operator's
    key (``sig``), with a timestamp and a nonce against replays."""

    cmd: str
    rollout_id: str = ""
    lag_s: float = 0.0
    throttled: bool = False
    ts_ms: int = 0
    nonce: str = ""
    sig: str = ""


_CONTROL = msgspec.json.Decoder(Control)
_ENC = msgspec.json.Encoder()
_SPEC = msgspec.json.Decoder(RolloutSpec)
_PLAN = msgspec.json.Decoder(WavePlan)
_WAVES = msgspec.json.Decoder(list[Wave])


def control_document(cmd: str, key: Ed25519PrivateKey | None, now_ms: int,
                     **fields: Any) -> bytes:
    """A control command as sent by the CLI: timestamped, with a nonce, signed if ``key``."""
    c = Control(cmd, ts_ms=now_ms, nonce=uuid.uuid4().hex, **fields)
    return _ENC.encode(sign(c, key) if key is not None else c)


class Coordinator(Supervised):
    """Fleet coordinator: registry, rollouts, job channel and state store."""

    def __init__(self, *, store: FleetStore, channel: CoordinatorChannel, clock: Clock,
                 registry: Registry | None = None, metrics: FleetMetrics | None = None,
                 commit_interval_s: float = 0.05, max_batch: int = 5000,
                 signing_key: Ed25519PrivateKey | None = None,
                 control_key: Ed25519PublicKey | None = None,
                 insecure_control: bool = False, holder: str = "") -> None:
        self.store = store
        self.channel = channel
        self.clock = clock
        self.registry = registry or Registry()
        self.metrics = metrics or FleetMetrics()
        self.core = FleetCore(self.registry, self)
        self.commit_interval_s = commit_interval_s
        self.max_batch = max_batch
        self.signing_key = signing_key
        self.control_key = control_key
        self.insecure_control = insecure_control
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}"
        self.token = 0  # fencing token of the lease, set by start()
        self._pending: list[TransitionRecord] = []
        self._dirty: set[str] = set()
        self._dirty_devices: set[int] = set()
        self._targets: list[tuple[str, list[str], int]] = []
        self._progress: dict[tuple[str, str], float] = {}
        self._detail: dict[tuple[str, str], str] = {}  # firmware phase + bytes per device
        self._outbox: list[OutboxRecord] = []
        self._next_outbox_id = 1
        self._out: asyncio.Queue[OutboxRecord] = asyncio.Queue()
        self._kick = asyncio.Event()
        self._flush_evt = asyncio.Event()
        self._urgent = asyncio.Event()  # commit now: the broker's in-flight window is full
        self._tasks: set[asyncio.Task[None]] = set()
        self._nonces: OrderedDict[str, None] = OrderedDict()
        self._reload_task: asyncio.Task[None] | None = None
        self._last_reload = -math.inf
        #: set when a task died or the lease was lost; ``error`` says why
        self.failed = asyncio.Event()
        self.error: BaseException | None = None
        self.rejected = 0
        self.refused = 0
        self.write_errors = 0
        self.transitions = 0
        self.reloads = 0
        self._io = 0  # store commits / outbox claims and sends in progress
        self._flush_lock = asyncio.Lock()
        self._finished: dict[str, asyncio.Event] = {}

    @property
    def busy(self) -> bool:
        """True while a commit, an outbox claim or a send is in progress or queued (lets a
        virtual-time test wait for real I/O before moving time on)."""
        return self._io > 0 or not self._out.empty()

    def now(self) -> float:
        """Wall time in epoch seconds from the injected clock."""
        return self.clock.time_ms() / 1000.0

    # -- Effects (called synchronously by the engine) --------------------------------
    def notify(self, rollout: Rollout, idx: int, op: str, attempt: int) -> None:
        dev = self.registry.ids[idx]
        doc = rollout.spec.document  # rollback needs it too (command hooks)
        msg = JobNotify(rollout.id, dev, op, attempt, doc)  # type: ignore[arg-type]
        if self.signing_key is not None:
            msg = sign(msg, self.signing_key)
        # not sent now: the outbox row goes out after the commit that holds the transition
        self._outbox.append(OutboxRecord(self._next_outbox_id, dev, encode(msg)))
        self._next_outbox_id += 1
        self.metrics.notifications.labels(op).inc()
        self._flush_evt.set()

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
        """Take the store's lease (a standby waits here), load persisted state, resume
        rollouts, queue unsent notifications, start the channel and the tasks."""
        self.token = await self.store.acquire_lease(self.holder)
        self.store.on_lease_lost(self._lease_lost)
        log.info("fleet coordinator active", holder=self.holder, token=self.token)
        await self._load()
        await self.store.listen_changes(self._registry_changed)
        await self.channel.start(self._on_message)
        for name, coro in (("timers", self._timer_loop()), ("sender", self._send_loop()),
                           ("writer", self._write_loop())):
            task = asyncio.create_task(coro, name=f"fleet[{name}]")
            self._tasks.add(task)
            task.add_done_callback(self._task_done)
        self._kick.set()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._task_died(task)

    async def stop(self) -> None:
        """Stop tasks, commit what is pending (acking its device messages), stop the
        channel and give the lease up. Unsent notifications stay in the outbox."""
        tasks = list(self._tasks)
        if self._reload_task is not None:
            tasks.append(self._reload_task)
        await cancel_all(tasks)
        try:
            if not isinstance(self.error, LeaseLost):
                await self.flush()
        finally:
            await self.channel.stop()
            await self.store.release_lease()

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
            if rec.backend not in ("", "mqtt"):
                log.warning("rollout of another job backend left alone", rollout=rec.rollout_id,
                            backend=rec.backend)
                continue
            spec = _SPEC.decode(rec.spec)
            rows = await self.store.load_device_states(rec.rollout_id)
            reg = self.registry
            targets = sorted(i for i in (reg.get_index(r.device_id) for r in rows)
                             if i is not None)
            r = Rollout(spec, reg, targets, self, Pacer(spec.pacing),
                        now=rec.created_ms / 1000.0, plan=_PLAN.decode(rec.plan))
            r.finished_at = rec.finished_ms / 1000.0
            known = [x for x in rows if reg.get_index(x.device_id) is not None]
            r.restore([(reg.index(x.device_id), x.state, x.attempts, x.since_ms / 1000.0)
                       for x in known], _WAVES.decode(rec.waves), rec.status, rec.reason, now)
            for x in known:
                if x.progress:
                    r.on_progress(reg.index(x.device_id), x.progress)
            self.core.rollouts[rec.rollout_id] = r
            if rec.status not in DONE_STATUSES:
                log.info("rollout resumed", rollout=rec.rollout_id, status=r.status)
        self._dirty.clear()
        self._pending.clear()
        self._progress.clear()
        self._detail.clear()
        # restore() may re-send rollbacks: those are new outbox rows, committed first
        fresh, self._outbox = self._outbox, []
        unsent = await self.store.load_outbox()
        for row in unsent:  # committed before the crash, never claimed: never sent
            self._out.put_nowait(row)
        self._next_outbox_id = max((x.id for x in unsent), default=0) + 1
        self._outbox = [OutboxRecord(self._next_outbox_id + i, d, p)
                        for i, (_, d, p) in enumerate(fresh)]
        self._next_outbox_id += len(fresh)
        if unsent:
            log.info("unsent notifications queued from the outbox", count=len(unsent))
        if self._outbox:
            self._flush_evt.set()

    async def reload_registry(self) -> int:
        """Pick up devices and groups written by the CLI while running; returns how many
        devices were new. Known devices keep their live health."""
        new = 0
        for row in await self.store.load_devices():
            if self.registry.get_index(row.device_id) is None:
                idx = self.registry.add(row.device_id, row.attrs, online=row.online)
                self.registry.report(idx, _health(row), row.last_seen_ms)
                self.registry.set_online(idx, row.online)
                new += 1
            else:
                self.registry.add(row.device_id, row.attrs)
        for g in await self.store.load_groups():
            self.registry.add_group(g)
        self.reloads += 1
        if new:
            log.info("registry reloaded", new_devices=new)
        return new

    def _registry_changed(self) -> None:
        if self._reload_task is None or self._reload_task.done():
            self._reload_task = asyncio.create_task(self._reload(), name="fleet[reload]")

    async def _reload(self) -> None:
        try:
            await self.reload_registry()
        except Exception as exc:  # the next change or load command retries
            log.warning("registry reload failed", error=repr(exc))

    async def load_pending(self) -> list[str]:
        """Reload the registry, then start rollouts created offline
        (``pymigrate fleet create-rollout``)."""
        await self.reload_registry()
        started = []
        for rec in await self.store.load_rollouts():
            if rec.status == PENDING and rec.rollout_id not in self.core.rollouts:
                await self.create_rollout(_SPEC.decode(rec.spec))
                started.append(rec.rollout_id)
        return started

    def _check_control(self, cmd: Control) -> None:
        if self.control_key is None:
            if self.insecure_control:
                return
            raise SignatureError("control commands are refused: no control key configured"
                                 " (serve --control-key)", reason="no_control_key")
        verify(cmd, self.control_key)
        skew = abs(self.clock.time_ms() - cmd.ts_ms) / 1000.0
        if skew > CONTROL_MAX_SKEW_S:
            raise SignatureError(f"control command is {skew:.0f} s off the coordinator clock",
                                 reason="stale")
        if not cmd.nonce or cmd.nonce in self._nonces:
            raise SignatureError("control command replayed", reason="replayed")
        self._nonces[cmd.nonce] = None
        while len(self._nonces) > 10_000:
            self._nonces.popitem(last=False)

    async def handle_control(self, payload: bytes) -> None:
        """An operator or ingest command (JSON, signed): ``{"cmd": "load"}``,
        ``{"cmd": "pause|resume|cancel|abort", "rollout_id": ...}`` or
        ``{"cmd": "ingest", "lag_s": ..., "throttled": ...}``."""
        self._flush_evt.set()
        try:
            cmd = _CONTROL.decode(payload)
            self._check_control(cmd)
            if cmd.cmd == "load":
                await self.load_pending()
            elif cmd.cmd == "ingest":
                self.report_ingest(lag_s=cmd.lag_s, throttled=cmd.throttled)
            else:
                self._op(cmd.rollout_id, cmd.cmd)
        except (msgspec.DecodeError, FleetError, SignatureError) as exc:
            self.rejected += 1
            log.warning("control command rejected", error=str(exc),
                        reason=getattr(exc, "reason", "malformed"))

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
        """Create and start a rollout; durable (targets, first wave, the transitions and
        outbox of its first notifications) when this returns."""
        now = self.now()
        r = self.core.create(spec, now, start=False)
        self._targets.append((r.id, [self.registry.ids[i] for i in r.targets],
                              int(now * 1000)))
        self._dirty.add(r.id)
        r.start(now)
        r.dispatch(now)
        await self.flush()
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
            self.metrics.set_progress(r.id, r.mean_progress())
            rollouts.append(r.progress(now))
        return {"fleet": msgspec.to_builtins(summary), "rollouts": rollouts,
                "documents_rejected": self.rejected, "documents_refused": self.refused,
                "transitions": self.transitions, "token": self.token}

    # -- device documents -----------------------------------------------------------
    async def _on_message(self, device_id: str, kind: str, payload: bytes) -> None:
        self._flush_evt.set()  # the next commit also acks this message to the broker
        if getattr(self.channel, "pending_acks", 0) >= ACK_EARLY:
            self._urgent.set()
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
            if self.registry.get_index(device_id) is None:
                self._maybe_reload()  # a device registered by the CLI meanwhile?
            refusal = JobNotify(job, device_id, "refused", reason="not_owner")
            if self.signing_key is not None:
                refusal = sign(refusal, self.signing_key)
            self._out.put_nowait(OutboxRecord(0, device_id, encode(refusal)))  # not state
            return
        except InvalidTransition as exc:  # pragma: no cover - engine guards its own states
            self.metrics.invalid_transitions.inc()
            log.error("invalid transition", error=str(exc))
            return
        if isinstance(msg, JobUpdate) and msg.refused:
            reason = msg.refused.partition(":")[0]
            self.metrics.device_refusals.labels(reason).inc()
            log.warning("device refused a notification", device=device_id, note=msg.refused)
        if isinstance(msg, JobUpdate) and msg.job_id is not None and msg.progress > 0:
            r = self.core.rollouts.get(msg.job_id)
            idx = self.registry.get_index(device_id)
            if r is not None and idx is not None and r.on_progress(idx, msg.progress):
                self._progress[(msg.job_id, device_id)] = r.device_progress(idx)
                self._flush_evt.set()
        if (isinstance(msg, JobUpdate) and msg.job_id is not None and msg.phase
                and msg.job_id in self.core.rollouts):
            self._detail[(msg.job_id, device_id)] = (
                f"{msg.phase[:16]} {max(0, msg.bytes_done)}/{max(0, msg.bytes_total)}")
            self._flush_evt.set()
        if isinstance(msg, JobUpdate | JobResult) and msg.health is not None:
            idx = self.registry.get_index(device_id)
            if idx is not None:
                self._dirty_devices.add(idx)
                self._flush_evt.set()
        self._kick.set()

    def _maybe_reload(self) -> None:
        now = self.clock.monotonic()
        if now - self._last_reload >= 1.0:
            self._last_reload = now
            self._registry_changed()

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
        backoff = self.commit_interval_s
        while True:
            # small chunks: a chunk is claimed, then published at once (QoS 1 in flight
            # together), so a crash loses at most one chunk's notifications (recovered by
            # the device timeout), never sends one twice
            batch = [await self._out.get()]
            while len(batch) < SEND_CHUNK and not self._out.empty():
                batch.append(self._out.get_nowait())
            self._io += 1
            try:
                await self._send_batch(batch)
            except _Retry:
                await self.clock.sleep(backoff)
                backoff = min(max(backoff * 2, 0.5), 30.0)
                continue
            finally:
                self._io -= 1
            backoff = self.commit_interval_s

    async def _send_batch(self, batch: list[OutboxRecord]) -> None:
        try:
            # claimed (deleted, fenced) before the publish: never sent twice
            await self.store.claim_outbox([x.id for x in batch if x.id], self.token)
        except LeaseLost:
            raise
        except Exception as exc:  # keep them, retry after a pause
            self.write_errors += 1
            log.error("outbox claim failed", error=repr(exc))
            for x in batch:
                self._out.put_nowait(x)
                self._out.task_done()
            raise _Retry from exc
        await asyncio.gather(*(self._send_one(x) for x in batch))

    async def _send_one(self, x: OutboxRecord) -> None:
        try:
            await self.channel.send(x.device_id, "notify", x.payload)
        except Exception as exc:  # a lost send is retried via timeout / pull
            log.warning("notify send failed", device=x.device_id, error=repr(exc))
        finally:
            self._out.task_done()

    async def _write_loop(self) -> None:
        backoff = self.commit_interval_s
        while True:
            await self._flush_evt.wait()
            # group-commit window (longer after errors); cut short when the broker waits
            # for acks before it sends more
            sleeper = asyncio.ensure_future(self.clock.sleep(backoff))
            urgent = asyncio.ensure_future(self._urgent.wait())
            try:
                await asyncio.wait({sleeper, urgent}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleeper.cancel()
                urgent.cancel()
            if backoff > self.commit_interval_s and not sleeper.done():
                await self.clock.sleep(backoff)  # after an error: no early retry
            self._urgent.clear()
            try:
                await self.flush()
                backoff = self.commit_interval_s
            except LeaseLost:
                raise  # another replica is active: stop acting (the process exits)
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
        """Commit pending transitions, rollout changes, health, progress and outbox in one
        transaction, then hand the outbox to the sender and ack the device messages."""
        async with self._flush_lock:
            self._flush_evt.clear()
            take_acks = getattr(self.channel, "take_acks", None)
            acks: list[Any] = take_acks() if callable(take_acks) else []
            recs, self._pending = self._pending, []
            dirty, self._dirty = self._dirty, set()
            devs, self._dirty_devices = self._dirty_devices, set()
            targets, self._targets = self._targets, []
            progress, self._progress = self._progress, {}
            detail, self._detail = self._detail, {}
            outbox, self._outbox = self._outbox, []
            for rid in dirty:  # keep the exported gauges current without a scan
                self.metrics.set_states(rid, self.core.rollouts[rid].counts)
            batch = Batch(recs, [self._record(self.core.rollouts[rid]) for rid in dirty],
                          [self.registry.row(i) for i in devs], targets,
                          [(r, d, p) for (r, d), p in progress.items()], outbox,
                          [(r, d, x) for (r, d), x in detail.items()])
            self._io += 1
            try:
                if batch:
                    await self.store.commit(batch, self.token)
            except BaseException:
                self._pending[:0] = recs
                self._dirty |= dirty
                self._dirty_devices |= devs
                self._targets[:0] = targets
                self._progress = {**progress, **self._progress}
                self._detail = {**detail, **self._detail}
                self._outbox[:0] = outbox
                restore = getattr(self.channel, "restore_acks", None)
                if callable(restore):
                    restore(acks)
                self._flush_evt.set()
                raise
            finally:
                self._io -= 1
            for x in outbox:
                self._out.put_nowait(x)
            ack = getattr(self.channel, "ack", None)
            if acks and callable(ack):
                ack(acks)

    async def drain(self) -> None:
        """Commit, then wait until queued notifications were handed to the channel."""
        await self.flush()
        await self._out.join()


class _Retry(Exception):
    """The outbox claim failed transiently: back off and retry the batch."""


def _health(row: Any) -> Health:
    return Health(online=row.online, backlog_bytes=row.backlog_bytes, lag_s=row.lag_s,
                  error_rate=row.error_rate)


def state_name(state: int) -> str:
    """Lower-case name of a device state."""
    return DeviceState(state).name.lower()
