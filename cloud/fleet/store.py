"""Coordinator state behind one small interface: SQLite (embedded) or PostgreSQL.

What is stored: the registry (devices, groups), rollouts (spec, plan, status, waves) and,
per rollout, each device's current state plus an append-only log of every transition.
The coordinator writes in group commits; on restart it reloads everything and resumes.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import msgspec

from cloud.fleet.registry import DeviceRow, Group


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


class RolloutRecord(msgspec.Struct):
    """A rollout as persisted: spec/plan/waves are JSON text."""

    rollout_id: str
    spec: str
    plan: str
    status: str
    reason: str = ""
    waves: str = "[]"
    created_ms: int = 0
    updated_ms: int = 0
    finished_ms: int = 0


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
    """Store for ``url``: ``postgresql://...`` or a SQLite file path / ``sqlite:///path``."""
    if url.startswith(("postgres://", "postgresql://")):
        from cloud.fleet.store_pg import PostgresFleetStore

        return PostgresFleetStore(url)
    from cloud.fleet.store_sqlite import SqliteFleetStore

    return SqliteFleetStore(url.removeprefix("sqlite://"))
