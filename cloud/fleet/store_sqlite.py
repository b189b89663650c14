"""SQLite (aiosqlite, WAL, ``synchronous=FULL``) implementation of
:class:`~cloud.fleet.store.FleetStore`: the single-node embedded default.

The lease is an exclusive ``flock`` on ``<path>.lock`` (a second coordinator on the same
file is refused with :class:`~cloud.fleet.store.LeaseHeld`) plus a token row, so the
fencing check on every write is the same as with PostgreSQL.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable

import aiosqlite

from cloud.fleet.registry import DeviceRow, Group
from cloud.fleet.states import FleetError
from cloud.fleet.store import (
    Batch,
    DeviceStateRow,
    LeaseHeld,
    LeaseLost,
    OutboxRecord,
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
CREATE TABLE IF NOT EXISTS fleet_outbox (id INTEGER PRIMARY KEY, device_id TEXT NOT NULL,
  payload BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS fleet_lease (name TEXT PRIMARY KEY, holder TEXT NOT NULL,
  token INTEGER NOT NULL);
"""
_UPSERT_STATE = ("INSERT INTO fleet_device_state (rollout_id, device_id, state, attempts,"
                 " since_ms) VALUES (?,?,?,?,?) ON CONFLICT(rollout_id, device_id) DO UPDATE"
                 " SET state=excluded.state, attempts=excluded.attempts,"
                 " since_ms=excluded.since_ms")
_UPSERT_ROLLOUT = "INSERT OR REPLACE INTO fleet_rollouts VALUES (?,?,?,?,?,?,?,?,?,?,?)"
_UPSERT_DEVICE = (
    "INSERT INTO fleet_devices VALUES (?,?,?,?,?,?,?) ON CONFLICT(device_id) DO UPDATE"
    " SET attrs=excluded.attrs, online=excluded.online, backlog=excluded.backlog,"
    " lag=excluded.lag, err=excluded.err, last_seen_ms=excluded.last_seen_ms")


def _rollout_row(rec: RolloutRecord) -> tuple[object, ...]:
    return (rec.rollout_id, rec.spec, rec.plan, rec.status, rec.reason, rec.waves,
            rec.created_ms, rec.updated_ms, rec.finished_ms, rec.backend, rec.backend_state)


def _device_row(r: DeviceRow) -> tuple[object, ...]:
    return (r.device_id, encode_attrs(r.attrs), int(r.online), r.backlog_bytes, r.lag_s,
            r.error_rate, r.last_seen_ms)


class SqliteFleetStore:
    """Embedded coordinator state in one SQLite file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None
        self._lock_fd: int | None = None

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise FleetError("store is not open", reason="store_closed")
        return self._db

    async def open(self) -> None:
        self._db = await aiosqlite.connect(self.path)
        await self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit survives power loss too, not only a killed process
        await self._db.execute("PRAGMA synchronous=FULL")
        await self._db.executescript(_SCHEMA)
        async with self._db.execute("PRAGMA table_info(fleet_device_state)") as cur:
            cols = {row[1] for row in await cur.fetchall()}
        if "progress" not in cols:  # state files written before progress was stored
            await self._db.execute("ALTER TABLE fleet_device_state ADD COLUMN progress REAL"
                                   " NOT NULL DEFAULT 0")
        if "detail" not in cols:  # ... and before the phase / bytes detail was
            await self._db.execute("ALTER TABLE fleet_device_state ADD COLUMN detail TEXT"
                                   " NOT NULL DEFAULT ''")
        async with self._db.execute("PRAGMA table_info(fleet_rollouts)") as cur:
            rcols = {row[1] for row in await cur.fetchall()}
        for col in ("backend", "backend_state"):  # files written before job backends
            if col not in rcols:
                await self._db.execute(f"ALTER TABLE fleet_rollouts ADD COLUMN {col} TEXT"
                                       " NOT NULL DEFAULT ''")
        await self._db.commit()

    async def close(self) -> None:
        await self.release_lease()
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def save_devices(self, rows: list[DeviceRow]) -> None:
        await self.db.executemany(_UPSERT_DEVICE, [_device_row(r) for r in rows])
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
        await self.db.execute(_UPSERT_ROLLOUT, _rollout_row(rec))
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
            _UPSERT_STATE, [(r.rollout_id, r.device_id, r.dst, r.attempt, r.at_ms) for r in recs])
        await db.commit()

    async def add_targets(self, rollout_id: str, device_ids: list[str], at_ms: int) -> None:
        await self.db.executemany(
            "INSERT OR IGNORE INTO fleet_device_state (rollout_id, device_id, state, attempts,"
            " since_ms) VALUES (?,?,0,0,?)", [(rollout_id, d, at_ms) for d in device_ids])
        await self.db.commit()

    async def load_device_states(self, rollout_id: str) -> list[DeviceStateRow]:
        async with self.db.execute(
                "SELECT device_id, state, attempts, since_ms, progress, detail"
                " FROM fleet_device_state"
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

    async def load_transitions(self, rollout_id: str) -> list[TransitionRecord]:
        async with self.db.execute(
                "SELECT rollout_id, device_id, src, dst, attempt, reason, at_ms FROM"
                " fleet_transitions WHERE rollout_id=? ORDER BY id", (rollout_id,)) as cur:
            return [TransitionRecord(*row) for row in await cur.fetchall()]

    # -- crash-safe group commits, outbox, lease ------------------------------------
    async def _fence(self, token: int) -> None:
        async with self.db.execute("SELECT token FROM fleet_lease WHERE name='coordinator'"
                                   ) as cur:
            row = await cur.fetchone()
        if row is None or int(row[0]) != token:
            raise LeaseLost(f"fencing token {token} is stale (lease token "
                            f"{None if row is None else row[0]})", token=token)

    async def commit(self, batch: Batch, token: int) -> None:
        db = self.db
        try:
            await self._fence(token)
            for rid, devs, at_ms in batch.targets:
                await db.executemany(
                    "INSERT OR IGNORE INTO fleet_device_state (rollout_id, device_id, state,"
                    " attempts, since_ms) VALUES (?,?,0,0,?)", [(rid, d, at_ms) for d in devs])
            if batch.transitions:
                await db.executemany(
                    "INSERT INTO fleet_transitions (rollout_id, device_id, src, dst, attempt,"
                    " reason, at_ms) VALUES (?,?,?,?,?,?,?)", batch.transitions)
                await db.executemany(_UPSERT_STATE, [
                    (r.rollout_id, r.device_id, r.dst, r.attempt, r.at_ms)
                    for r in batch.transitions])
            if batch.progress:
                await db.executemany("UPDATE fleet_device_state SET progress=? WHERE"
                                     " rollout_id=? AND device_id=?",
                                     [(p, r, d) for r, d, p in batch.progress])
            if batch.detail:
                await db.executemany("UPDATE fleet_device_state SET detail=? WHERE"
                                     " rollout_id=? AND device_id=?",
                                     [(x, r, d) for r, d, x in batch.detail])
            if batch.rollouts:
                await db.executemany(_UPSERT_ROLLOUT, [_rollout_row(r) for r in batch.rollouts])
            if batch.devices:
                await db.executemany(_UPSERT_DEVICE, [_device_row(r) for r in batch.devices])
            if batch.outbox:
                await db.executemany("INSERT INTO fleet_outbox VALUES (?,?,?)", batch.outbox)
            await db.commit()
        except BaseException:
            await db.rollback()
            raise

    async def claim_outbox(self, ids: list[int], token: int) -> None:
        if not ids:
            return
        try:
            await self._fence(token)
            await self.db.executemany("DELETE FROM fleet_outbox WHERE id=?", [(i,) for i in ids])
            await self.db.commit()
        except BaseException:
            await self.db.rollback()
            raise

    async def load_outbox(self) -> list[OutboxRecord]:
        async with self.db.execute("SELECT id, device_id, payload FROM fleet_outbox ORDER BY id"
                                   ) as cur:
            return [OutboxRecord(int(i), d, bytes(p)) for i, d, p in await cur.fetchall()]

    async def acquire_lease(self, holder: str) -> int:
        if self.path != ":memory:" and self._lock_fd is None:
            fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise LeaseHeld(f"another coordinator uses {self.path} (lock file "
                                f"{self.path}.lock is held); SQLite is single-node: use a "
                                "postgresql:// store for replicas", path=self.path) from None
            self._lock_fd = fd
        db = self.db
        await db.execute("INSERT INTO fleet_lease VALUES ('coordinator', ?, 1) ON CONFLICT(name)"
                         " DO UPDATE SET token=token+1, holder=excluded.holder", (holder,))
        async with db.execute("SELECT token FROM fleet_lease WHERE name='coordinator'") as cur:
            row = await cur.fetchone()
        await db.commit()
        assert row is not None
        return int(row[0])

    async def release_lease(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def on_lease_lost(self, callback: Callable[[], None]) -> None:
        """The lock file cannot be lost while this process lives: nothing to watch."""

    async def listen_changes(self, callback: Callable[[], None]) -> None:
        """SQLite cannot notify: the CLI sends ``load`` on the control topic instead."""

    async def notify_changes(self) -> None:
        """See :meth:`listen_changes`."""
