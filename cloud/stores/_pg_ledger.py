"""The completeness ledger in PostgreSQL (the SQLite store's tables, :mod:`cloud.stores._sqlite`,
in PostgreSQL's dialect): streams, chunk digests, gap records, conflicts kept apart; and
the idempotency state and dead letters every PostgreSQL ledger keeps.

Every function runs on the caller's connection, inside its write transaction where it is
part of a batch (the stream's idempotency row is locked ``FOR UPDATE`` first, so replicas
writing one stream serialize there). Used by the PostgreSQL store (stored sequence numbers
are its ``readings``) and by :class:`cloud.stores.ledger_pg.PgLedger` (the ledger of a
store without transactions; stored sequence numbers are recorded as runs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cloud.dedup import IdempotencyState
from cloud.stores._sqlite import _runs_dec, gap_of_row, now_ms, runs_blob, stream_key
from cloud.stores.completeness import BatchMeta, BatchPlan, StreamReport, account, runs_union
from pymigrate.types import seq_runs_of

__all__ = ["PG_LEDGER_SCHEMA", "pg_completeness", "pg_dead_letter", "pg_dead_letters",
           "pg_digests", "pg_gap_runs", "pg_idempotency_state", "pg_lock_state",
           "pg_replace_out", "pg_save_ledger"]

Conn = Any

PG_LEDGER_SCHEMA = """
CREATE TABLE IF NOT EXISTS streams (
  device_id text NOT NULL,
  instance text NOT NULL,
  seq_base bigint NOT NULL,
  hwm bigint NOT NULL,
  first_seen_ms bigint NOT NULL,
  last_seen_ms bigint NOT NULL,
  peer text NOT NULL DEFAULT '',
  duplicates bigint NOT NULL DEFAULT 0,
  ranges_forgotten bigint NOT NULL DEFAULT 0,
  state_ranges bigint NOT NULL DEFAULT 0,
  PRIMARY KEY (device_id, instance)
);
CREATE TABLE IF NOT EXISTS chunk_digests (
  device_id text NOT NULL,
  instance text NOT NULL,
  seq_first bigint NOT NULL,
  seq_last bigint NOT NULL,
  count integer NOT NULL,
  checksum bigint NOT NULL,
  PRIMARY KEY (device_id, instance, seq_first)
);
CREATE TABLE IF NOT EXISTS gaps (
  device_id text NOT NULL,
  instance text NOT NULL,
  seq_first bigint NOT NULL,
  seq_last bigint NOT NULL,
  count bigint NOT NULL,
  reason text NOT NULL,
  ts_ms bigint NOT NULL,
  runs bytea,
  detail text NOT NULL DEFAULT '',
  received_ms bigint NOT NULL,
  PRIMARY KEY (device_id, instance, seq_first, seq_last, reason)
);
CREATE TABLE IF NOT EXISTS conflicts (
  id bigserial PRIMARY KEY,
  device_id text NOT NULL,
  instance text NOT NULL,
  batch_id text NOT NULL,
  seq_first bigint NOT NULL,
  seq_last bigint NOT NULL,
  count integer NOT NULL,
  checksum bigint NOT NULL,
  stored_checksum bigint,
  payload bytea,
  received_ms bigint NOT NULL
);
"""

_GAP_INSERT = ("INSERT INTO gaps (device_id, instance, seq_first, seq_last, count, reason,"
               " ts_ms, runs, detail, received_ms) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10)"
               " ON CONFLICT DO NOTHING")
_GAP_COLS = "seq_first, seq_last, count, reason, ts_ms, runs, detail"


async def pg_lock_state(conn: Conn, key: str) -> tuple[IdempotencyState, bool]:
    """The stream's idempotency state, locked ``FOR UPDATE`` until the transaction ends;
    True when its row had to be created."""
    sql = "SELECT state FROM idempotency WHERE device_id = $1 FOR UPDATE"
    blob = await conn.fetchval(sql, key)
    if blob is None:
        # a first write: make the row exist so FOR UPDATE has something to lock;
        # a racing replica's insert waits on the unique key, then does nothing
        empty = IdempotencyState().to_bytes()
        await conn.execute(
            "INSERT INTO idempotency (device_id, state, updated_ms) VALUES ($1, $2, $3)"
            " ON CONFLICT (device_id) DO NOTHING", key, empty, now_ms())
        blob = await conn.fetchval(sql, key)
        return IdempotencyState.from_bytes(bytes(blob)), True
    return IdempotencyState.from_bytes(bytes(blob)), False


async def pg_idempotency_state(conn: Conn, device_id: str,
                               instance: str = "") -> IdempotencyState:
    blob = await conn.fetchval("SELECT state FROM idempotency WHERE device_id = $1",
                               stream_key(device_id, instance))
    return IdempotencyState() if blob is None else IdempotencyState.from_bytes(bytes(blob))


async def pg_dead_letter(conn: Conn, device_id: str, batch_id: str, reason: str,
                         payload: bytes, peer: str = "") -> None:
    await conn.execute(
        "INSERT INTO dead_letters (device_id, batch_id, reason, payload, received_ms,"
        " peer) VALUES ($1, $2, $3, $4, $5, $6)", device_id, batch_id, reason, payload,
        now_ms(), peer)


async def pg_dead_letters(conn: Conn, limit: int = 100) -> list[tuple[str, str, str]]:
    rows = await conn.fetch(
        "SELECT device_id, batch_id, reason FROM dead_letters ORDER BY id DESC LIMIT $1",
        limit)
    return [(r[0] or "", r[1] or "", r[2]) for r in rows]


async def pg_digests(conn: Conn, device_id: str, instance: str,
                     firsts: Sequence[int]) -> dict[int, tuple[int, int, int]]:
    if not firsts:
        return {}
    rows = await conn.fetch(
        "SELECT seq_first, seq_last, count, checksum FROM chunk_digests WHERE device_id = $1"
        " AND instance = $2 AND seq_first = ANY($3::bigint[])", device_id, instance,
        list(firsts))
    return {int(r[0]): (int(r[1]), int(r[2]), int(r[3])) for r in rows}


async def pg_gap_runs(conn: Conn, device_id: str, instance: str, lo: int,
                      hi: int) -> list[tuple[int, int]]:
    rows = await conn.fetch(
        f"SELECT {_GAP_COLS} FROM gaps WHERE device_id = $1 AND instance = $2"
        " AND seq_first <= $3 AND seq_last >= $4 AND runs IS NOT NULL",
        device_id, instance, hi, lo)
    return runs_union(*(gap_of_row(tuple(r)).runs for r in rows))


async def pg_replace_out(conn: Conn, delete: Sequence[tuple[str, str, int]],
                         now: int) -> None:
    """Delete stored copies a replacing gateway policy supersedes; each leaves a
    ``gateway_replaced`` gap on its own stream."""
    gone: dict[tuple[str, str], list[int]] = {}
    for dev, inst, seq in delete:  # that stream's row only (ids may be shared)
        for r in await conn.fetch("DELETE FROM readings WHERE device_id = $1 AND instance = $2"
                                  " AND seq = $3 RETURNING device_id, instance, seq",
                                  dev, inst, seq):
            gone.setdefault((str(r[0]), str(r[1])), []).append(int(r[2]))
    for (dev, inst), seqs in gone.items():
        runs = seq_runs_of(seqs)
        await conn.execute(_GAP_INSERT, dev, inst, runs[0][0], runs[-1][1], len(seqs),
                           "gateway_replaced", now, runs_blob(runs),
                           "another gateway's copy of the event replaced it", now)


async def pg_save_ledger(conn: Conn, device_id: str, batch_id: str, meta: BatchMeta,
                         plan: BatchPlan, now: int) -> None:
    """Digests of new chunks, gap records, conflicts (payload kept), the stream row."""
    inst = meta.instance
    if plan.digests:
        await conn.executemany(
            "INSERT INTO chunk_digests (device_id, instance, seq_first, seq_last, count,"
            " checksum) VALUES ($1,$2,$3,$4,$5,$6) ON CONFLICT DO NOTHING",
            [(device_id, inst, c.seq_first, c.seq_last, c.count, c.checksum)
             for c in plan.digests])
    if plan.gaps:
        await conn.executemany(_GAP_INSERT, [
            (device_id, inst, g.seq_first, g.seq_last, g.count, g.reason, g.ts_ms,
             runs_blob(g.runs), g.detail, now) for g in plan.gaps])
    if plan.conflicts:
        stored = await pg_digests(conn, device_id, inst,
                                  [c.seq_first for c, _ in plan.conflicts])
        await conn.executemany(
            "INSERT INTO conflicts (device_id, instance, batch_id, seq_first, seq_last, count,"
            " checksum, stored_checksum, payload, received_ms)"
            " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10)",
            [(device_id, inst, batch_id, c.seq_first, c.seq_last, n, c.checksum,
              stored[c.seq_first][2] if c.seq_first in stored else None, meta.payload, now)
             for c, n in plan.conflicts])
    st = plan.state
    await conn.execute(
        "INSERT INTO streams (device_id, instance, seq_base, hwm, first_seen_ms, last_seen_ms,"
        " peer, duplicates, ranges_forgotten, state_ranges)"
        " VALUES ($1,$2,$3,$4,$5,$5,$6,$7,$8,$9)"
        " ON CONFLICT (device_id, instance) DO UPDATE SET"
        " seq_base = least(streams.seq_base, excluded.seq_base),"
        " hwm = greatest(streams.hwm, excluded.hwm), last_seen_ms = excluded.last_seen_ms,"
        " peer = excluded.peer, duplicates = streams.duplicates + excluded.duplicates,"
        " ranges_forgotten = CASE WHEN $10 THEN excluded.ranges_forgotten"
        " ELSE streams.ranges_forgotten END,"
        " state_ranges = CASE WHEN $10 THEN excluded.state_ranges ELSE streams.state_ranges END",
        device_id, inst, meta.seq_base, meta.hwm, now, meta.peer[:128], plan.duplicates,
        st.ranges_forgotten if st else 0, len(st.ranges()) if st else 0, st is not None)


async def _recorded_runs(conn: Conn, device_id: str, instance: str) -> list[tuple[int, int]]:
    """A ledger's record of what landed elsewhere (``stored_runs``)."""
    rows = await conn.fetch("SELECT runs FROM stored_runs WHERE device_id = $1 AND"
                            " instance = $2", device_id, instance)
    return runs_union(*(_runs_dec.decode(bytes(r[0])) for r in rows))


async def _stored_runs(conn: Conn, device_id: str, instance: str) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    async with conn.transaction():
        async for (seq,) in conn.cursor(
                "SELECT DISTINCT seq FROM readings WHERE device_id = $1 AND instance = $2"
                " ORDER BY seq", device_id, instance, prefetch=10_000):
            if runs and seq == runs[-1][1] + 1:
                runs[-1] = (runs[-1][0], seq)
            else:
                runs.append((seq, seq))
    return runs


async def pg_completeness(conn: Conn, device_id: str | None, *,
                          recorded: bool = False) -> list[StreamReport]:
    """Account every stream (of one device): see :func:`cloud.stores.completeness.account`.

    ``recorded``: the stored sequence numbers are the ledger's ``stored_runs`` (a ledger
    for another database), not the rows of ``readings``."""
    where, args = ("WHERE device_id = $1", [device_id]) if device_id else ("", [])
    streams: dict[tuple[str, str], tuple[int, int, int, int, int]] = {}
    for r in await conn.fetch(
            "SELECT device_id, instance, seq_base, hwm, last_seen_ms, ranges_forgotten,"
            f" state_ranges FROM streams {where}", *args):
        streams[(str(r[0]), str(r[1]))] = (int(r[2]), int(r[3]), int(r[4]), int(r[5]),
                                           int(r[6]))
    # streams that wrote before the ledger existed
    for table in ("gaps", "stored_runs" if recorded else "readings"):
        for r in await conn.fetch(f"SELECT DISTINCT device_id, instance FROM {table} {where}",
                                  *args):
            streams.setdefault((str(r[0]), str(r[1])), (1, 0, 0, 0, 0))
    out: list[StreamReport] = []
    for (dev, inst), (base, hwm, seen, forgotten, nranges) in sorted(streams.items()):
        gaps = [gap_of_row(tuple(r)) for r in await conn.fetch(
            f"SELECT {_GAP_COLS} FROM gaps WHERE device_id = $1 AND instance = $2", dev, inst)]
        conflicts = await conn.fetchval(
            "SELECT coalesce(sum(count), 0) FROM conflicts WHERE device_id = $1 AND"
            " instance = $2", dev, inst)
        dups = 0
        if not recorded:
            # a hypertable's key holds ts_ms: one seq stored at two timestamps would be a
            # duplicate the key cannot forbid; count them
            dups = await conn.fetchval(
                "SELECT count(*) - count(DISTINCT seq) FROM readings WHERE device_id = $1"
                " AND instance = $2", dev, inst)
        stored = await (_recorded_runs if recorded else _stored_runs)(conn, dev, inst)
        out.append(account(dev, inst, seq_base=base, hwm=hwm, stored=stored, gaps=gaps,
                           duplicates=int(dups or 0), conflicts=int(conflicts or 0),
                           last_seen_ms=seen, ranges_forgotten=forgotten,
                           state_ranges=nranges))
    return out
