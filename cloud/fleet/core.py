"""Routing of device messages to rollouts, with ownership checks (I/O-free).

The channel vouches for the sender (the MQTT topic names the device; broker ACLs bind
a client to its own topics). A message whose ``device_id`` differs from the channel's,
or that reports on a job (rollout) the device is not a target of, is refused with
:class:`~cloud.fleet.states.NotOwner`.
"""

from __future__ import annotations

import math

from cloud.fleet.engine import Effects, Rollout
from cloud.fleet.pacing import Pacer
from cloud.fleet.protocol import JobResult, JobStart, JobUpdate, Message
from cloud.fleet.registry import Registry
from cloud.fleet.spec import RolloutSpec, effective_plan, validate
from cloud.fleet.states import FleetError, NotOwner, UnknownRollout


class FleetCore:
    """Registry + rollouts; every call takes ``now`` (wall epoch seconds)."""

    def __init__(self, registry: Registry, effects: Effects) -> None:
        self.registry = registry
        self.effects = effects
        self.rollouts: dict[str, Rollout] = {}
        self._now = 0.0
        registry.on_online.append(self._online)

    def active(self) -> list[Rollout]:
        """Rollouts not yet finished."""
        return [r for r in self.rollouts.values() if not r.done]

    def create(self, spec: RolloutSpec, now: float, *, start: bool = True) -> Rollout:
        """Create a rollout over the spec's group (resolved now) and start its first wave."""
        validate(spec)
        if spec.rollout_id in self.rollouts:
            raise FleetError(f"rollout {spec.rollout_id!r} exists", reason="exists")
        targets = self.registry.resolve(spec.group)
        plan = effective_plan(len(targets), spec)
        r = Rollout(spec, self.registry, targets, self.effects, Pacer(spec.pacing), now=now,
                    plan=plan)
        self.rollouts[spec.rollout_id] = r
        self.effects.changed(r)
        if start:
            r.start(now)
            r.dispatch(now)
        return r

    def get(self, rollout_id: str) -> Rollout:
        """A rollout by id; raises :class:`UnknownRollout`."""
        try:
            return self.rollouts[rollout_id]
        except KeyError:
            raise UnknownRollout(f"unknown rollout {rollout_id!r}",
                                 rollout_id=rollout_id) from None

    def _owned(self, idx: int, job_id: str | None, device_id: str) -> Rollout:
        r = self.rollouts.get(job_id or "")
        if r is None or not r.owns(idx):
            raise NotOwner(f"{device_id} does not own job {job_id!r}", device_id=device_id,
                           job_id=job_id)
        return r

    def handle(self, channel_device: str, msg: Message, now: float) -> None:
        """Apply one device message. Raises :class:`NotOwner` for refused messages."""
        self._now = now
        if not isinstance(msg, JobStart | JobUpdate | JobResult):
            raise NotOwner("devices may not send notify documents", device_id=channel_device)
        if msg.device_id != channel_device:
            raise NotOwner(f"{channel_device} sent a document for {msg.device_id}",
                           device_id=channel_device)
        idx = self.registry.get_index(channel_device)
        if idx is None:
            raise NotOwner(f"unknown device {channel_device}", device_id=channel_device)
        if isinstance(msg, JobStart):
            if msg.job_id is None:
                self.registry.set_online(idx, True)
                for r in self.active():
                    if r.owns(idx):
                        r.on_pull(idx, now)
                        r.dispatch(now)
                return
            r = self._owned(idx, msg.job_id, channel_device)
            r.on_start(idx, msg.attempt, now)
            return
        if isinstance(msg, JobUpdate):
            if msg.job_id is not None:
                self._owned(idx, msg.job_id, channel_device)
            if msg.health is not None:
                self.registry.report(idx, msg.health, int(now * 1000))
                for r in self.active():
                    if r.owns(idx):
                        r.on_health(idx, msg.health, now)
                        r.dispatch(now)
            return
        r = self._owned(idx, msg.job_id, channel_device)
        if msg.health is not None:
            self.registry.report(idx, msg.health, int(now * 1000))
        r.on_result(idx, msg.status, msg.attempt, now, retriable=msg.retriable,
                    reason=msg.reason, health=msg.health)
        r.dispatch(now)

    def _online(self, idx: int) -> None:
        for r in self.active():
            if r.owns(idx):
                r.on_online(idx, self._now)
                r.dispatch(self._now)

    def report_ingest(self, now: float, *, lag_s: float = 0.0, throttled: bool = False) -> None:
        """Back-pressure from the cloud ingest: slows every active rollout."""
        for r in self.active():
            r.pacer.report(now, lag_s=lag_s, throttled=throttled)

    def tick(self, now: float) -> None:
        """Fire due timers and dispatch in every active rollout."""
        self._now = now
        for r in self.active():
            if r.next_deadline() <= now:
                r.tick(now)

    def next_deadline(self) -> float:
        """Earliest time :meth:`tick` is needed (inf: wait for events)."""
        return min((r.next_deadline() for r in self.active()), default=math.inf)
