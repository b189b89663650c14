"""Coordinator state behind one small interface: SQLite (embedded) or PostgreSQL.

What is stored: the registry (devices, groups), rollouts (spec, plan, status, waves) and,
per rollout, each device's current state and progress plus an append-only log of every
transition, and the *outbox*: notifications not yet handed to the channel.

Crash safety: the coordinator writes in group commits (:meth:`FleetStore.commit`): the
transitions, rollout records and the notifications they caused go into one transaction.
A notification is sent only after that commit, so a device never hears of a state change
that a crash could lose. Before sending, the sender *claims* its outbox rows (deletes them
in a fenced transaction): a notification is sent at most once per (job, attempt); one lost
in a crash between the claim and the publish is recovered by the device timeout (a new
attempt) or by the device's pull when it reconnects.

Leadership: :meth:`FleetStore.acquire_lease` makes this process the only active
coordinator of the store and returns a fencing token, checked by every coordinator write
(:class:`LeaseLost` when another replica took over). PostgreSQL: a session advisory lock
(a standby blocks on it and takes over as soon as the active session dies) plus a token
row. SQLite: an exclusive lock file (single node: a second process is refused).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

import msgspec

from cloud.fleet.registry import DeviceRow, Group
from cloud.fleet.states import FleetError


class TransitionRecord(NamedTuple):
    """One persisted state transition."""

    rollout_id: str
    device_id: str
    src: int
    dst: int
    attempt: int
    reason: str
    at_ms: int


class DeviceStateRow(NamedTuple):
    """Current state of one device in one rollout."""

    device_id: str
    state: int
    attempts: int
    since_ms: int
    progress: float = 0.0
    detail: str = ""  # last reported phase and bytes, e.g. "download 150000/300000"


class OutboxRecord(NamedTuple):
    """A committed notification waiting to be sent."""

    id: int
    device_id: str
    payload: bytes


class Batch(msgspec.Struct):
    """Everything one group commit writes, in one transaction."""

    transitions: list[TransitionRecord] = msgspec.field(default_factory=list)
    rollouts: list[RolloutRecord] = msgspec.field(default_factory=list)
    devices: list[DeviceRow] = msgspec.field(default_factory=list)
    #: (rollout_id, device_ids, at_ms) of new rollouts (state queued)
    targets: list[tuple[str, list[str], int]] = msgspec.field(default_factory=list)
    #: (rollout_id, device_id, progress 0..1) reported by devices
    progress: list[tuple[str, str, float]] = msgspec.field(default_factory=list)
    outbox: list[OutboxRecord] = msgspec.field(default_factory=list)

    #: (rollout_id, device_id, "phase done/total") reported by devices (firmware jobs)
    detail: list[tuple[str, str, str]] = msgspec.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.transitions or self.rollouts or self.devices or self.targets
                    or self.progress or self.outbox or self.detail)


class LeaseLost(FleetError):
    """Another coordinator holds the store's lease (the fencing token moved on)."""

    reason = "lease_lost"


class LeaseHeld(FleetError):
    """The store is in use by another coordinator (SQLite: single node)."""

    reason = "lease_held"


class RolloutRecord(msgspec.Struct):
    """A rollout as persisted: spec/plan/waves are JSON text. ``backend`` names the job
    backend running it ("" = the built-in MQTT coordinator, ``aws-iot-jobs``);
    ``backend_state`` is that backend's own JSON (AWS: the rollback job and its counts)."""

    rollout_id: str
    spec: str
    plan: str
    status: str
    reason: str = ""
    waves: str = "[]"
    created_ms: int = 0
    updated_ms: int = 0
    finished_ms: int = 0
    backend: str = ""
    backend_state: str = ""


class FleetStore(Protocol):
    """Persistence of the coordinator."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def save_devices(self, rows: list[DeviceRow]) -> None:
        """Upsert registry rows."""

    async def load_devices(self) -> list[DeviceRow]:
        """Every registered device."""

    async def save_group(self, group: Group) -> None:
        """Upsert a group."""

    async def load_groups(self) -> list[Group]:
        """Every group."""

    async def save_rollout(self, rec: RolloutRecord) -> None:
        """Upsert a rollout record."""

    async def load_rollouts(self) -> list[RolloutRecord]:
        """Every rollout record."""

    async def save_transitions(self, recs: list[TransitionRecord]) -> None:
        """Append to the transition log and update device states, in one transaction."""

    async def add_targets(self, rollout_id: str, device_ids: list[str], at_ms: int) -> None:
        """Record the target devices of a new rollout (state queued)."""

    async def load_device_states(self, rollout_id: str) -> list[DeviceStateRow]:
        """Current device states of a rollout."""

    async def state_counts(self, rollout_id: str) -> dict[int, int]:
        """Devices per state in a rollout (from the device-state table)."""

    async def transition_count(self, rollout_id: str) -> int:
        """Number of logged transitions of a rollout."""

    async def load_transitions(self, rollout_id: str) -> list[TransitionRecord]:
        """The transition log of a rollout in commit order (audits)."""

    async def commit(self, batch: Batch, token: int) -> None:
        """Write ``batch`` in one transaction if ``token`` is still the lease's fencing
        token; raises :class:`LeaseLost` otherwise (nothing written)."""

    async def claim_outbox(self, ids: list[int], token: int) -> None:
        """Remove outbox rows about to be sent (fenced like :meth:`commit`)."""

    async def load_outbox(self) -> list[OutboxRecord]:
        """Committed notifications not yet claimed, in commit order."""

    async def acquire_lease(self, holder: str) -> int:
        """Become the active coordinator (may wait for it); returns the fencing token."""

    async def release_lease(self) -> None:
        """Give the lease up (clean stop)."""

    def on_lease_lost(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` if the lease is lost while held (e.g. the lock session died)."""

    async def listen_changes(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when the registry changes (written by the CLI meanwhile);
        a no-op where the backend cannot notify."""

    async def notify_changes(self) -> None:
        """Tell running coordinators that the registry changed."""


_DEV = msgspec.json.Encoder()
_GROUP_DEC = msgspec.json.Decoder(Group)
_ATTRS_DEC = msgspec.json.Decoder(dict[str, str])


def encode_attrs(attrs: dict[str, str]) -> str:
    """JSON text of device attributes."""
    return _DEV.encode(attrs).decode()


def decode_attrs(text: str) -> dict[str, str]:
    """Device attributes from JSON text."""
    return _ATTRS_DEC.decode(text)


def encode_group(group: Group) -> str:
    """JSON text of a group."""
    return _DEV.encode(group).decode()


def decode_group(text: str) -> Group:
    """Group from JSON text."""
    return _GROUP_DEC.decode(text)


def open_store(url: str) -> FleetStore:
    """Store for ``url``: ``postgresql://...`` (``?fleet_schema=NAME`` picks the schema,
    default ``pymigrate_fleet``) or a SQLite file path / ``sqlite:///path``."""
    if url.startswith(("postgres://", "postgresql://")):
        from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

        from cloud.fleet.store_pg import PostgresFleetStore

        parts = urlsplit(url)
        query = parse_qsl(parts.query)
        schema = next((v for k, v in query if k == "fleet_schema"), "pymigrate_fleet")
        dsn = urlunsplit(parts._replace(query=urlencode(
            [(k, v) for k, v in query if k != "fleet_schema"])))
        return PostgresFleetStore(dsn, schema=schema)
    from cloud.fleet.store_sqlite import SqliteFleetStore

    return SqliteFleetStore(url.removeprefix("sqlite://"))
