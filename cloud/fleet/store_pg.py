"""PostgreSQL (asyncpg) implementation of :class:`~cloud.fleet.store.FleetStore`.

All tables live in ``schema`` (default ``pymigrate_fleet``) so tests can use their own.

High availability: every ``fleet serve`` replica calls :meth:`acquire_lease`, which blocks
on a session-level advisory lock keyed by the schema on a dedicated connection. The one
that holds it is active; when its process dies, PostgreSQL ends its session and releases
the lock, and a standby gets it within moments (TCP keepalives on that session bound the
case of a host that vanished without closing its socket). Taking the lock increments the
fencing token in ``<schema>.lease``; every write transaction first reads the token
``FOR SHARE`` and raises :class:`~cloud.fleet.store.LeaseLost` when it moved on, so a
stalled former leader can never write after a takeover. The lock session also LISTENs on
``<schema>_changes``: the CLI NOTIFYs it after adding devices or groups.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable
from typing import Any

import asyncpg
import structlog

from cloud.fleet.registry import DeviceRow, Group
from cloud.fleet.states import FleetError
from cloud.fleet.store import (
    Batch,
    DeviceStateRow,
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
ALTER TABLE {s}.device_state ADD COLUMN IF NOT EXISTS progress REAL NOT NULL DEFAULT 0;
ALTER TABLE {s}.device_state ADD COLUMN IF NOT EXISTS detail TEXT NOT NULL DEFAULT '';
ALTER TABLE {s}.rollouts ADD COLUMN IF NOT EXISTS backend TEXT NOT NULL DEFAULT '';
ALTER TABLE {s}.rollouts ADD COLUMN IF NOT EXISTS backend_state TEXT NOT NULL DEFAULT '';
CREATE TABLE IF NOT EXISTS {s}.outbox (id BIGINT PRIMARY KEY, device_id TEXT NOT NULL,
  payload BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS {s}.lease (name TEXT PRIMARY KEY, holder TEXT NOT NULL,
  token BIGINT NOT NULL, since TIMESTAMPTZ NOT NULL DEFAULT now());
"""
log = structlog.get_logger("pymigrate.fleet")


def _rollout_args(r: RolloutRecord) -> tuple[object, ...]:
    return (r.rollout_id, r.spec, r.plan, r.status, r.reason, r.waves, r.created_ms,
            r.updated_ms, r.finished_ms, r.backend, r.backend_state)


class PostgresFleetStore:
    """Production coordinator state in PostgreSQL."""

    def __init__(self, dsn: str, *, schema: str = "pymigrate_fleet") -> None:
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", schema):
            raise FleetError(f"bad schema name {schema!r}", reason="config")
        self.dsn = dsn
        self.s = schema
        self._pool: Any = None
        self._lease_con: Any = None
        self._lost_cbs: list[Callable[[], None]] = []
        self._released = False

    @property
    def pool(self) -> Any:
        if self._pool is None:
            raise FleetError("store is not open", reason="store_closed")
        return self._pool

    async def open(self) -> None:
        self._pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=4)
        # serialise schema creation between replicas starting together
        async with self.pool.acquire() as con, con.transaction():
            await con.execute("SELECT pg_advisory_xact_lock(hashtext($1))",
                              f"pymigrate_fleet_ddl:{self.s}")
            await con.execute(_SCHEMA.format(s=self.s))

    async def close(self) -> None:
        await self.release_lease()
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

    @property
    def _upsert_rollout(self) -> str:
        return (f"INSERT INTO {self.s}.rollouts (rollout_id, spec, plan, status, reason, waves,"
                " created_ms, updated_ms, finished_ms, backend, backend_state) VALUES"
                " ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11) ON CONFLICT (rollout_id) DO UPDATE SET"
                " spec=EXCLUDED.spec, plan=EXCLUDED.plan, status=EXCLUDED.status,"
                " reason=EXCLUDED.reason, waves=EXCLUDED.waves, updated_ms=EXCLUDED.updated_ms,"
                " finished_ms=EXCLUDED.finished_ms, backend=EXCLUDED.backend,"
                " backend_state=EXCLUDED.backend_state")

    async def save_rollout(self, rec: RolloutRecord) -> None:
        async with self.pool.acquire() as con:
            await con.execute(self._upsert_rollout, *_rollout_args(rec))

    async def load_rollouts(self) -> list[RolloutRecord]:
        async with self.pool.acquire() as con:
            rows = await con.fetch(
                f"SELECT rollout_id, spec, plan, status, reason, waves, created_ms, updated_ms,"
                f" finished_ms, backend, backend_state FROM {self.s}.rollouts"
                " ORDER BY created_ms")
        return [RolloutRecord(*tuple(r)) for r in rows]

    async def save_transitions(self, recs: list[TransitionRecord]) -> None:
        if not recs:
            return
        async with self.pool.acquire() as con, con.transaction():
            await con.executemany(
                f"INSERT INTO {self.s}.transitions (rollout_id, device_id, src, dst, attempt,"
                " reason, at_ms) VALUES ($1,$2,$3,$4,$5,$6,$7)", recs)
            await con.executemany(
                self._upsert_state,
                [(r.rollout_id, r.device_id, r.dst, r.attempt, r.at_ms) for r in recs])

    @property
    def _upsert_state(self) -> str:
        return (f"INSERT INTO {self.s}.device_state (rollout_id, device_id, state, attempts,"
                " since_ms) VALUES ($1,$2,$3,$4,$5) ON CONFLICT (rollout_id, device_id) DO"
                " UPDATE SET state=EXCLUDED.state, attempts=EXCLUDED.attempts,"
                " since_ms=EXCLUDED.since_ms")

    @property
    def _insert_target(self) -> str:
        return (f"INSERT INTO {self.s}.device_state (rollout_id, device_id, state, attempts,"
                " since_ms) VALUES ($1,$2,0,0,$3) ON CONFLICT DO NOTHING")

    async def add_targets(self, rollout_id: str, device_ids: list[str], at_ms: int) -> None:
        async with self.pool.acquire() as con:
            await con.executemany(self._insert_target,
                                  [(rollout_id, d, at_ms) for d in device_ids])

    async def load_device_states(self, rollout_id: str) -> list[DeviceStateRow]:
        async with self.pool.acquire() as con:
            rows = await con.fetch(f"SELECT device_id, state, attempts, since_ms, progress,"
                                   f" detail FROM {self.s}.device_state WHERE rollout_id=$1",
                                   rollout_id)
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

    async def load_transitions(self, rollout_id: str) -> list[TransitionRecord]:
        async with self.pool.acquire() as con:
            rows = await con.fetch(f"SELECT rollout_id, device_id, src, dst, attempt, reason,"
                                   f" at_ms FROM {self.s}.transitions WHERE rollout_id=$1"
                                   " ORDER BY id", rollout_id)
        return [TransitionRecord(*tuple(r)) for r in rows]

    # -- crash-safe group commits, outbox, lease ------------------------------------
    async def _fence(self, con: Any, token: int) -> None:
        # FOR SHARE: a takeover's token update waits for this transaction, and this one
        # sees a committed takeover: no write with a stale token commits after it
        cur = await con.fetchval(f"SELECT token FROM {self.s}.lease WHERE name='coordinator'"
                                 " FOR SHARE")
        if cur != token:
            raise LeaseLost(f"fencing token {token} is stale (lease token {cur})", token=token)

    async def commit(self, batch: Batch, token: int) -> None:
        s = self.s
        async with self.pool.acquire() as con, con.transaction():
            await self._fence(con, token)
            for rid, devs, at_ms in batch.targets:
                await con.executemany(self._insert_target, [(rid, d, at_ms) for d in devs])
            if batch.transitions:
                await con.executemany(
                    f"INSERT INTO {s}.transitions (rollout_id, device_id, src, dst, attempt,"
                    " reason, at_ms) VALUES ($1,$2,$3,$4,$5,$6,$7)", batch.transitions)
                await con.executemany(self._upsert_state, [
                    (r.rollout_id, r.device_id, r.dst, r.attempt, r.at_ms)
                    for r in batch.transitions])
            if batch.progress:
                await con.executemany(f"UPDATE {s}.device_state SET progress=$3 WHERE"
                                      " rollout_id=$1 AND device_id=$2", batch.progress)
            if batch.detail:
                await con.executemany(f"UPDATE {s}.device_state SET detail=$3 WHERE"
                                      " rollout_id=$1 AND device_id=$2", batch.detail)
            if batch.rollouts:
                await con.executemany(self._upsert_rollout,
                                      [_rollout_args(r) for r in batch.rollouts])
            if batch.devices:
                await con.executemany(
                    f"INSERT INTO {s}.devices (device_id, attrs, online, backlog, lag, err,"
                    " last_seen_ms) VALUES ($1,$2,$3,$4,$5,$6,$7) ON CONFLICT (device_id) DO"
                    " UPDATE SET attrs=EXCLUDED.attrs, online=EXCLUDED.online,"
                    " backlog=EXCLUDED.backlog, lag=EXCLUDED.lag, err=EXCLUDED.err,"
                    " last_seen_ms=EXCLUDED.last_seen_ms",
                    [(r.device_id, encode_attrs(r.attrs), r.online, r.backlog_bytes, r.lag_s,
                      r.error_rate, r.last_seen_ms) for r in batch.devices])
            if batch.outbox:
                await con.executemany(f"INSERT INTO {s}.outbox VALUES ($1,$2,$3)",
                                      batch.outbox)

    async def claim_outbox(self, ids: list[int], token: int) -> None:
        if not ids:
            return
        async with self.pool.acquire() as con, con.transaction():
            await self._fence(con, token)
            await con.execute(f"DELETE FROM {self.s}.outbox WHERE id = ANY($1::bigint[])", ids)

    async def load_outbox(self) -> list[OutboxRecord]:
        async with self.pool.acquire() as con:
            rows = await con.fetch(f"SELECT id, device_id, payload FROM {self.s}.outbox"
                                   " ORDER BY id")
        return [OutboxRecord(int(r[0]), r[1], bytes(r[2])) for r in rows]

    async def acquire_lease(self, holder: str) -> int:
        con = await asyncpg.connect(self.dsn)
        try:
            # a host that vanishes without closing its socket frees the lock in ~15 s
            await con.execute("SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 2;"
                              " SET tcp_keepalives_count = 5")
            await con.execute("SELECT pg_advisory_lock(hashtext($1))",
                              f"pymigrate_fleet:{self.s}")
            token = await con.fetchval(
                f"INSERT INTO {self.s}.lease (name, holder, token) VALUES ('coordinator', $1, 1)"
                " ON CONFLICT (name) DO UPDATE SET token = lease.token + 1,"
                " holder = EXCLUDED.holder, since = now() RETURNING token", holder)
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.shield(con.close(timeout=2))
            raise
        self._lease_con = con
        self._released = False
        con.add_termination_listener(self._terminated)
        return int(token)

    def _terminated(self, _con: Any) -> None:
        if self._released:
            return
        log.error("fleet lease session lost: this coordinator is no longer active",
                  schema=self.s)
        for cb in self._lost_cbs:
            cb()

    async def release_lease(self) -> None:
        con, self._lease_con = self._lease_con, None
        self._released = True
        if con is not None:
            with contextlib.suppress(Exception):
                await con.close(timeout=5)  # ends the session: the lock is released

    def on_lease_lost(self, callback: Callable[[], None]) -> None:
        self._lost_cbs.append(callback)

    async def listen_changes(self, callback: Callable[[], None]) -> None:
        if self._lease_con is None:
            return
        await self._lease_con.add_listener(f"{self.s}_changes",
                                           lambda *_: callback())

    async def notify_changes(self) -> None:
        async with self.pool.acquire() as con:
            await con.execute("SELECT pg_notify($1, '')", f"{self.s}_changes")

    async def drop_schema(self) -> None:
        """Drop this store's schema (tests)."""
        async with self.pool.acquire() as con:
            await con.execute(f"DROP SCHEMA IF EXISTS {self.s} CASCADE")
