"""PostgreSQL (asyncpg) implementation of :class:`~cloud.fleet.store.FleetStore`.

All tables live in ``schema`` (default ``pymigrate_fleet``) so tests can use their own.
"""

from __future__ import annotations

import re
from typing import Any

import asyncpg

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
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.devices (device_id TEXT PRIMARY KEY, attrs TEXT NOT NULL,
  online BOOLEAN NOT NULL, backlog BIGINT NOT NULL, lag DOUBLE PRECISION NOT NULL,
  err DOUBLE PRECISION NOT NULL, last_seen_ms BIGINT NOT NULL, seq BIGSERIAL);
CREATE TABLE IF NOT EXISTS {s}.groups (name TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS {s}.rollouts (rollout_id TEXT PRIMARY KEY, spec TEXT NOT NULL,
  plan TEXT NOT NULL, status TEXT NOT NULL, reason TEXT NOT NULL, waves TEXT NOT NULL,
  created_ms BIGINT NOT NULL, updated_ms BIGINT NOT NULL, finished_ms BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS {s}.device_state (rollout_id TEXT NOT NULL, device_id TEXT NOT NULL,
  state SMALLINT NOT NULL, attempts SMALLINT NOT NULL, since_ms BIGINT NOT NULL,
  PRIMARY KEY (rollout_id, device_id));
CREATE TABLE IF NOT EXISTS {s}.transitions (id BIGSERIAL PRIMARY KEY, rollout_id TEXT NOT NULL,
  device_id TEXT NOT NULL, src SMALLINT NOT NULL, dst SMALLINT NOT NULL,
  attempt SMALLINT NOT NULL, reason TEXT NOT NULL, at_ms BIGINT NOT NULL);
CREATE INDEX IF NOT EXISTS transitions_rollout ON {s}.transitions (rollout_id);
"""


class PostgresFleetStore:
    """Production coordinator state in PostgreSQL."""

    def __init__(self, dsn: str, *, schema: str = "pymigrate_fleet") -> None:
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", schema):
            raise FleetError(f"bad schema name {schema!r}", reason="config")
        self.dsn = dsn
        self.s = schema
        self._pool: Any = None

    @property
    def pool(self) -> Any:
        if self._pool is None:
            raise FleetError("store is not open", reason="store_closed")
        return self._pool

    async def open(self) -> None:
        self._pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=4)
        async with self.pool.acquire() as con:
            await con.execute(_SCHEMA.format(s=self.s))

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def save_devices(self, rows: list[DeviceRow]) -> None:
        async with self.pool.acquire() as con:
            await con.executemany(
                f"INSERT INTO {self.s}.devices (device_id, attrs, online, backlog, lag, err,"
                " last_seen_ms) VALUES ($1,$2,$3,$4,$5,$6,$7) ON CONFLICT (device_id) DO UPDATE"
                " SET attrs=EXCLUDED.attrs, online=EXCLUDED.online, backlog=EXCLUDED.backlog,"
                " lag=EXCLUDED.lag, err=EXCLUDED.err, last_seen_ms=EXCLUDED.last_seen_ms",
                [(r.device_id, encode_attrs(r.attrs), r.online, r.backlog_bytes, r.lag_s,
                  r.error_rate, r.last_seen_ms) for r in rows])

    async def load_devices(self) -> list[DeviceRow]:
        async with self.pool.acquire() as con:
            rows = await con.fetch(f"SELECT device_id, attrs, online, backlog, lag, err,"
                                   f" last_seen_ms FROM {self.s}.devices ORDER BY seq")
        return [DeviceRow(r[0], decode_attrs(r[1]), r[2], r[3], r[4], r[5], r[6])
                for r in rows]

    async def save_group(self, group: Group) -> None:
        async with self.pool.acquire() as con:
            await con.execute(f"INSERT INTO {self.s}.groups VALUES ($1,$2) ON CONFLICT (name)"
                              " DO UPDATE SET doc=EXCLUDED.doc", group.name, encode_group(group))

    async def load_groups(self) -> list[Group]:
        async with self.pool.acquire() as con:
            rows = await con.fetch(f"SELECT doc FROM {self.s}.groups")
        return [decode_group(r[0]) for r in rows]

    async def save_rollout(self, rec: RolloutRecord) -> None:
        async with self.pool.acquire() as con:
            await con.execute(
                f"INSERT INTO {self.s}.rollouts VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9)"
                " ON CONFLICT (rollout_id) DO UPDATE SET spec=EXCLUDED.spec, plan=EXCLUDED.plan,"
                " status=EXCLUDED.status, reason=EXCLUDED.reason, waves=EXCLUDED.waves,"
                " updated_ms=EXCLUDED.updated_ms, finished_ms=EXCLUDED.finished_ms",
                rec.rollout_id, rec.spec, rec.plan, rec.status, rec.reason, rec.waves,
                rec.created_ms, rec.updated_ms, rec.finished_ms)

    async def load_rollouts(self) -> list[RolloutRecord]:
        async with self.pool.acquire() as con:
            rows = await con.fetch(f"SELECT * FROM {self.s}.rollouts ORDER BY created_ms")
        return [RolloutRecord(*tuple(r)) for r in rows]

    async def save_transitions(self, recs: list[TransitionRecord]) -> None:
        if not recs:
            return
        async with self.pool.acquire() as con, con.transaction():
            await con.executemany(
                f"INSERT INTO {self.s}.transitions (rollout_id, device_id, src, dst, attempt,"
                " reason, at_ms) VALUES ($1,$2,$3,$4,$5,$6,$7)", recs)
            await con.executemany(
                f"INSERT INTO {self.s}.device_state VALUES ($1,$2,$3,$4,$5)"
                " ON CONFLICT (rollout_id, device_id) DO UPDATE SET state=EXCLUDED.state,"
                " attempts=EXCLUDED.attempts, since_ms=EXCLUDED.since_ms",
                [(r.rollout_id, r.device_id, r.dst, r.attempt, r.at_ms) for r in recs])

    async def add_targets(self, rollout_id: str, device_ids: list[str], at_ms: int) -> None:
        async with self.pool.acquire() as con:
            await con.executemany(
                f"INSERT INTO {self.s}.device_state VALUES ($1,$2,0,0,$3)"
                " ON CONFLICT DO NOTHING", [(rollout_id, d, at_ms) for d in device_ids])

    async def load_device_states(self, rollout_id: str) -> list[DeviceStateRow]:
        async with self.pool.acquire() as con:
            rows = await con.fetch(f"SELECT device_id, state, attempts, since_ms FROM"
                                   f" {self.s}.device_state WHERE rollout_id=$1", rollout_id)
        return [DeviceStateRow(*tuple(r)) for r in rows]

    async def state_counts(self, rollout_id: str) -> dict[int, int]:
        async with self.pool.acquire() as con:
            rows = await con.fetch(f"SELECT state, count(*) FROM {self.s}.device_state"
                                   " WHERE rollout_id=$1 GROUP BY state", rollout_id)
        return {int(r[0]): int(r[1]) for r in rows}

    async def transition_count(self, rollout_id: str) -> int:
        async with self.pool.acquire() as con:
            n = await con.fetchval(f"SELECT count(*) FROM {self.s}.transitions"
                                   " WHERE rollout_id=$1", rollout_id)
        return int(n)

    async def drop_schema(self) -> None:
        """Drop this store's schema (tests)."""
        async with self.pool.acquire() as con:
            await con.execute(f"DROP SCHEMA IF EXISTS {self.s} CASCADE")
