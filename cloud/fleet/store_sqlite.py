"""SQLite (aiosqlite, WAL) implementation of :class:`~cloud.fleet.store.FleetStore`."""

from __future__ import annotations

import aiosqlite

from cloud.fleet.registry import DeviceRow, Group
from cloud.fleet.states import FleetError
from cloud.fleet.store import (
    DeviceStateRow,
    RolloutRecord,
    TransitionRecord,
    decode_attrs,
    decode_group,
    encode_attrs,
    encode_group,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS fleet_devices (device_id TEXT PRIMARY KEY, attrs TEXT NOT NULL,
  online INTEGER NOT NULL, backlog INTEGER NOT NULL, lag REAL NOT NULL, err REAL NOT NULL,
  last_seen_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS fleet_groups (name TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS fleet_rollouts (rollout_id TEXT PRIMARY KEY, spec TEXT NOT NULL,
  plan TEXT NOT NULL, status TEXT NOT NULL, reason TEXT NOT NULL, waves TEXT NOT NULL,
  created_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL, finished_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS fleet_device_state (rollout_id TEXT NOT NULL,
  device_id TEXT NOT NULL, state INTEGER NOT NULL, attempts INTEGER NOT NULL,
  since_ms INTEGER NOT NULL, PRIMARY KEY (rollout_id, device_id));
CREATE TABLE IF NOT EXISTS fleet_transitions (id INTEGER PRIMARY KEY AUTOINCREMENT,
  rollout_id TEXT NOT NULL, device_id TEXT NOT NULL, src INTEGER NOT NULL,
  dst INTEGER NOT NULL, attempt INTEGER NOT NULL, reason TEXT NOT NULL, at_ms INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS fleet_transitions_rollout ON fleet_transitions (rollout_id);
"""


class SqliteFleetStore:
    """Embedded coordinator state in one SQLite file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise FleetError("store is not open", reason="store_closed")
        return self._db

    async def open(self) -> None:
        self._db = await aiosqlite.connect(self.path)
        await self._db.execute("PRAGMA journal_mode=WAL")
        await self._db.execute("PRAGMA synchronous=NORMAL")
        await self._db.executescript(_SCHEMA)
        await self._db.commit()

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def save_devices(self, rows: list[DeviceRow]) -> None:
        await self.db.executemany(
            "INSERT INTO fleet_devices VALUES (?,?,?,?,?,?,?) ON CONFLICT(device_id) DO UPDATE"
            " SET attrs=excluded.attrs, online=excluded.online, backlog=excluded.backlog,"
            " lag=excluded.lag, err=excluded.err, last_seen_ms=excluded.last_seen_ms",
            [(r.device_id, encode_attrs(r.attrs), int(r.online), r.backlog_bytes, r.lag_s,
              r.error_rate, r.last_seen_ms) for r in rows])
        await self.db.commit()

    async def load_devices(self) -> list[DeviceRow]:
        async with self.db.execute("SELECT * FROM fleet_devices ORDER BY rowid") as cur:
            return [DeviceRow(d, decode_attrs(a), bool(o), b, la, e, ls)
                    for d, a, o, b, la, e, ls in await cur.fetchall()]

    async def save_group(self, group: Group) -> None:
        await self.db.execute("INSERT OR REPLACE INTO fleet_groups VALUES (?,?)",
                              (group.name, encode_group(group)))
        await self.db.commit()

    async def load_groups(self) -> list[Group]:
        async with self.db.execute("SELECT doc FROM fleet_groups") as cur:
            return [decode_group(d) for (d,) in await cur.fetchall()]

    async def save_rollout(self, rec: RolloutRecord) -> None:
        await self.db.execute(
            "INSERT OR REPLACE INTO fleet_rollouts VALUES (?,?,?,?,?,?,?,?,?)",
            (rec.rollout_id, rec.spec, rec.plan, rec.status, rec.reason, rec.waves,
             rec.created_ms, rec.updated_ms, rec.finished_ms))
        await self.db.commit()

    async def load_rollouts(self) -> list[RolloutRecord]:
        async with self.db.execute("SELECT * FROM fleet_rollouts ORDER BY created_ms") as cur:
            return [RolloutRecord(*row) for row in await cur.fetchall()]

    async def save_transitions(self, recs: list[TransitionRecord]) -> None:
        if not recs:
            return
        db = self.db
        await db.executemany("INSERT INTO fleet_transitions (rollout_id, device_id, src, dst,"
                             " attempt, reason, at_ms) VALUES (?,?,?,?,?,?,?)", recs)
        await db.executemany(
            "INSERT INTO fleet_device_state VALUES (?,?,?,?,?) ON CONFLICT(rollout_id,"
            " device_id) DO UPDATE SET state=excluded.state, attempts=excluded.attempts,"
            " since_ms=excluded.since_ms",
            [(r.rollout_id, r.device_id, r.dst, r.attempt, r.at_ms) for r in recs])
        await db.commit()

    async def add_targets(self, rollout_id: str, device_ids: list[str], at_ms: int) -> None:
        await self.db.executemany(
            "INSERT OR IGNORE INTO fleet_device_state VALUES (?,?,0,0,?)",
            [(rollout_id, d, at_ms) for d in device_ids])
        await self.db.commit()

    async def load_device_states(self, rollout_id: str) -> list[DeviceStateRow]:
        async with self.db.execute(
                "SELECT device_id, state, attempts, since_ms FROM fleet_device_state"
                " WHERE rollout_id=?", (rollout_id,)) as cur:
            return [DeviceStateRow(*row) for row in await cur.fetchall()]

    async def state_counts(self, rollout_id: str) -> dict[int, int]:
        async with self.db.execute(
                "SELECT state, count(*) FROM fleet_device_state WHERE rollout_id=?"
                " GROUP BY state", (rollout_id,)) as cur:
            return {int(s): int(n) for s, n in await cur.fetchall()}

    async def transition_count(self, rollout_id: str) -> int:
        async with self.db.execute("SELECT count(*) FROM fleet_transitions WHERE rollout_id=?",
                                   (rollout_id,)) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0
