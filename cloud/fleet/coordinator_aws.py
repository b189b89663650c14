"""The coordinator service on AWS IoT Jobs (``pymigrate fleet serve --backend aws-iot-jobs``).

Place in the system::

    fleet store (lease, rollout records, device states)
        <- AwsCoordinator: picks up rollouts, one named task per rollout
            -> AwsRollout (cloud.fleet.backend_aws) -> AWS IoT (one job per wave)

* Leadership: like the MQTT coordinator it is active only while it holds the store's
  lease (:meth:`~cloud.fleet.store.FleetStore.acquire_lease`, a standby waits in
  :meth:`AwsCoordinator.start`); every write is a fenced
  :meth:`~cloud.fleet.store.FleetStore.commit`. A lost lease sets :attr:`failed` with
  :class:`~cloud.fleet.store.LeaseLost` and the process exits.
* Pick-up: a rollout stored by ``pymigrate fleet create-rollout`` (status ``pending``) is
  started when the store says something changed (PostgreSQL NOTIFY, sent by
  create-rollout) or at the latest ``poll_s`` later (SQLite cannot notify). Rollouts this
  backend was running when the previous process died are resumed at start.
* Progress is the rollout record: status, reason, ``waves`` (index, positions, job id,
  gate, execution counts), ``backend_state`` (rollback job, its counts), ``finished_ms``;
  and per device the state table and transition log, mapped from the execution statuses
  (QUEUED, IN_PROGRESS, SUCCEEDED...; rollback: rolling_back, rolled_back), so
  ``pymigrate fleet status`` reads it like a built-in rollout.
* Waiting is sleeping: the scan task waits on the change event, ``stop`` or a ``poll_s``
  sleep; each rollout task sleeps ``poll_s`` between reads of its job (AWS IoT has no
  push to the job owner).
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

import msgspec
import structlog

from cloud.fleet.backend_aws import (
    CANCELLED,
    FINAL,
    RUNNING,
    AwsJobsBackend,
    AwsProgress,
    AwsRollout,
    AwsRolloutResult,
    AwsWave,
    Change,
)
from cloud.fleet.registry import Registry
from cloud.fleet.service import Supervised, cancel_all
from cloud.fleet.spec import RolloutSpec, WavePlan, effective_plan
from cloud.fleet.states import DeviceState, FleetError
from cloud.fleet.store import Batch, FleetStore, LeaseLost, RolloutRecord, TransitionRecord
from pymigrate.clock import Clock, WallClock

log = structlog.get_logger("pymigrate.fleet.aws")

BACKEND = AwsJobsBackend.name
PENDING = "pending"  # as written by create-rollout (cloud.fleet.coordinator.PENDING)
S = DeviceState
#: execution status of a wave's job -> device state shown by ``fleet status``
APPLY_STATE = {"QUEUED": S.QUEUED, "IN_PROGRESS": S.IN_PROGRESS, "SUCCEEDED": S.SUCCEEDED,
               "FAILED": S.FAILED, "TIMED_OUT": S.TIMED_OUT, "REJECTED": S.REJECTED,
               "CANCELED": S.SKIPPED, "REMOVED": S.SKIPPED}
#: execution status of the rollback job -> device state
ROLLBACK_STATE = {"QUEUED": S.ROLLING_BACK, "IN_PROGRESS": S.ROLLING_BACK,
                  "SUCCEEDED": S.ROLLED_BACK, "FAILED": S.FAILED, "TIMED_OUT": S.FAILED,
                  "REJECTED": S.FAILED, "CANCELED": S.FAILED, "REMOVED": S.FAILED}


class AwsBackendState(msgspec.Struct):
    """The rollout record's ``backend_state`` on this backend."""

    rollback_job: str = ""
    rollback_started_at: float = 0.0
    rollback_counts: dict[str, int] = msgspec.field(default_factory=dict)


_ENC = msgspec.json.Encoder()
_SPEC = msgspec.json.Decoder(RolloutSpec)
_PLAN = msgspec.json.Decoder(WavePlan)
_WAVES = msgspec.json.Decoder(list[AwsWave])
_STATE = msgspec.json.Decoder(AwsBackendState)


def progress_of(rec: RolloutRecord) -> AwsProgress:
    """The :class:`AwsProgress` persisted in a rollout record of this backend."""
    extra = _STATE.decode(rec.backend_state) if rec.backend_state else AwsBackendState()
    return AwsProgress(rec.status, rec.reason, _WAVES.decode(rec.waves), extra.rollback_job,
                       extra.rollback_started_at, extra.rollback_counts,
                       rec.finished_ms / 1000.0)


def result_of(rec: RolloutRecord) -> AwsRolloutResult:
    """The outcome as recorded (counts: the waves' execution counts added up)."""
    p = progress_of(rec)
    counts: dict[str, int] = {}
    for w in p.waves:
        for k, n in w.counts.items():
            counts[k] = counts.get(k, 0) + n
    return AwsRolloutResult(rec.rollout_id, p.status, p.reason, [w.job_id for w in p.waves],
                            counts, p.rollback_job)


class StoreJournal:
    """Makes an :class:`AwsRollout`'s progress durable in the fleet store: one fenced
    commit with the rollout record and the device transitions per save."""

    def __init__(self, store: FleetStore, rec: RolloutRecord, token: int, clock: Clock,
                 states: dict[str, int]) -> None:
        self.store = store
        self.rec = rec
        self.token = token
        self.clock = clock
        self.states = states  # device -> state as stored

    async def save(self, rollout: AwsRollout, changes: list[Change]) -> None:
        now_ms = self.clock.time_ms()
        rid = self.rec.rollout_id
        trans: list[TransitionRecord] = []
        new: dict[str, int] = {}
        for thing, phase, status in changes:
            dst = (ROLLBACK_STATE if phase == "rollback" else APPLY_STATE).get(status)
            src = new.get(thing, self.states.get(thing, S.QUEUED))
            if dst is None or dst == src:
                continue
            trans.append(TransitionRecord(rid, thing, int(src), int(dst), 1,
                                          f"aws:{phase}:{status}", now_ms))
            new[thing] = dst
        p = rollout.progress
        self.rec = msgspec.structs.replace(
            self.rec, status=p.status, reason=p.reason, waves=_ENC.encode(p.waves).decode(),
            updated_ms=now_ms, finished_ms=int(p.finished_at * 1000), backend=BACKEND,
            backend_state=_ENC.encode(AwsBackendState(
                p.rollback_job, p.rollback_started_at, p.rollback_counts)).decode())
        await self.store.commit(Batch(transitions=trans, rollouts=[self.rec]), self.token)
        self.states.update(new)


class AwsCoordinator(Supervised):
    """Runs the store's rollouts through AWS IoT Jobs while it holds the lease."""

    def __init__(self, *, store: FleetStore, backend: AwsJobsBackend,
                 clock: Clock | None = None, poll_s: float = 30.0, holder: str = "") -> None:
        self.store = store
        self.backend = backend
        self.clock = clock or WallClock()
        self.poll_s = poll_s
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}"
        self.token = 0
        self.rollouts: dict[str, asyncio.Task[AwsRolloutResult]] = {}
        self.results: dict[str, AwsRolloutResult] = {}
        #: set when a task died or the lease was lost; ``error`` says why
        self.failed = asyncio.Event()
        self.error: BaseException | None = None
        self._kick = asyncio.Event()
        self._scanner: asyncio.Task[None] | None = None

    async def start(self, *, scan: bool = True) -> None:
        """Take the store's lease (a standby waits here), then watch the store for
        rollouts (``scan``; without it only :meth:`run_rollout` starts one)."""
        self.token = await self.store.acquire_lease(self.holder)
        self.store.on_lease_lost(self._lease_lost)
        log.info("fleet coordinator active", backend=BACKEND, holder=self.holder,
                 token=self.token)
        if scan:
            await self.store.listen_changes(self._kick.set)
            self._scanner = asyncio.create_task(self._scan_loop(), name="fleet-aws[scan]")
            self._scanner.add_done_callback(self._task_died)

    async def stop(self) -> None:
        """Stop the rollout tasks (their progress is already stored) and give the lease up;
        a later start continues them."""
        tasks: list[asyncio.Task[Any]] = [t for t in self.rollouts.values() if not t.done()]
        if self._scanner is not None:
            tasks.append(self._scanner)
        await cancel_all(tasks)
        await self.store.release_lease()

    async def load_pending(self, only: str = "") -> list[str]:
        """Start pending rollouts and resume unfinished ones of this backend (``only``:
        just that one); returns the ids started now."""
        started = []
        for rec in await self.store.load_rollouts():
            if rec.rollout_id in self.rollouts or (only and rec.rollout_id != only):
                continue
            if rec.status == PENDING or (rec.backend == BACKEND and rec.status not in FINAL):
                self._spawn(rec)
                started.append(rec.rollout_id)
        return started

    async def run_rollout(self, rollout_id: str) -> AwsRolloutResult:
        """Start or resume one stored rollout and wait for its outcome."""
        await self.load_pending(only=rollout_id)
        task = self.rollouts.get(rollout_id)
        if task is None:
            raise FleetError(f"rollout {rollout_id!r} is not pending nor running on "
                             f"{BACKEND}", reason="not_runnable", rollout_id=rollout_id)
        return await task

    # -- internals --------------------------------------------------------------------
    def _spawn(self, rec: RolloutRecord) -> None:
        task = asyncio.create_task(self._run(rec), name=f"fleet-aws[{rec.rollout_id}]")
        self.rollouts[rec.rollout_id] = task
        task.add_done_callback(self._task_died)

    async def _run(self, rec: RolloutRecord) -> AwsRolloutResult:
        spec = _SPEC.decode(rec.spec)
        reg = Registry()
        reg.load_rows(await self.store.load_devices())
        for g in await self.store.load_groups():
            reg.add_group(g)
        now_ms = self.clock.time_ms()
        if rec.status == PENDING:
            now = {r.rollout_id: r for r in await self.store.load_rollouts()}
            cur = now.get(rec.rollout_id, rec)
            if cur.status != PENDING:  # cancelled by the CLI meanwhile
                return result_of(cur)
            try:
                things = [reg.ids[i] for i in reg.resolve(spec.group)]
            except FleetError as exc:
                things, why = [], str(exc)
            else:
                why = f"group {spec.group!r} has no devices"
            plan = effective_plan(len(things), spec)
            rec = msgspec.structs.replace(
                rec, status=RUNNING if things else CANCELLED, reason="" if things else why,
                plan=_ENC.encode(plan).decode(), waves="[]", updated_ms=now_ms,
                finished_ms=0 if things else now_ms, backend=BACKEND, backend_state="")
            # the targets are fixed here: a restart resumes over the same devices
            await self.store.commit(Batch(rollouts=[rec], targets=[(rec.rollout_id, things,
                                                                    now_ms)]), self.token)
            states: dict[str, int] = dict.fromkeys(things, int(S.QUEUED))
            log.info("rollout started", rollout=rec.rollout_id, backend=BACKEND,
                     devices=len(things), reason=rec.reason)
        else:
            rows = await self.store.load_device_states(rec.rollout_id)
            # target order is registry order, as when the rollout started
            rows.sort(key=lambda r: (reg.get_index(r.device_id) is None,
                                     reg.get_index(r.device_id) or 0, r.device_id))
            things = [r.device_id for r in rows]
            states = {r.device_id: r.state for r in rows}
            log.info("rollout resumed", rollout=rec.rollout_id, backend=BACKEND,
                     status=rec.status)
        journal = StoreJournal(self.store, rec, self.token, self.clock, states)
        rollout = AwsRollout(self.backend, spec, things, clock=self.clock, poll_s=self.poll_s,
                             progress=progress_of(rec), journal=journal,
                             plan=_PLAN.decode(rec.plan))
        res = await rollout.run()
        self.results[rec.rollout_id] = res
        return res

    async def _scan_loop(self) -> None:
        while True:
            self._kick.clear()
            try:
                await self.load_pending()
            except LeaseLost:
                raise
            except Exception as exc:  # the store may be back on the next round
                log.warning("scan for rollouts failed", error=repr(exc))
            kick = asyncio.ensure_future(self._kick.wait())
            nap = asyncio.ensure_future(self.clock.sleep(self.poll_s))
            try:
                await asyncio.wait({kick, nap}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                kick.cancel()
                nap.cancel()

