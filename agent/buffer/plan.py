"""Group commit, phase one: turn pending appends into a plan, then write it.

:func:`build_plan` works out in memory what one transaction does (sequence numbers, open
chunks grown, chunks sealed, staging blobs); :func:`write_plan` writes it with SQL.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiosqlite
import msgspec

from agent.buffer.ledger import Effects, Key, Ledger
from agent.codec import ChunkCodec, seal_chunk
from pymigrate.types import Chunk, Priority, Reading


@dataclass(slots=True)
class OpenChunk:
    """The open chunk of one (device, priority): committed readings not yet sealed."""

    readings: list[Reading]
    deadline: float  # monotonic time at which it is sealed by age


@dataclass(slots=True)
class Append:
    readings: Sequence[Reading]
    fut: asyncio.Future[list[Reading]]
    since: float  # monotonic arrival time: its group commit is due at since + window
    state: tuple[str, bytes] | None = None  # committed in the same transaction
    dedup: bytes = b""  # packed uint64 edge-dedup fingerprints, same transaction


@dataclass
class Plan:
    """One group commit worked out in memory before touching the database."""

    callers: list[Append]
    results: list[list[Reading]] = field(default_factory=list)
    next_seq: dict[str, int] = field(default_factory=dict)
    new_open: dict[Key, OpenChunk | None] = field(default_factory=dict)
    seal: list[Chunk] = field(default_factory=list)
    clear_staging: set[Key] = field(default_factory=set)
    stage: list[tuple[Key, bytes]] = field(default_factory=list)
    states: dict[str, bytes] = field(default_factory=dict)
    dedup: list[bytes] = field(default_factory=list)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    floor: int = len(Priority)  # most important priority among new data (4 = none)

    @property
    def new_bytes(self) -> int:
        return sum(len(c.payload) for c in self.seal) + sum(len(b) for _, b in self.stage)


def build_plan(plan: Plan, open_chunks: dict[Key, OpenChunk], next_seq: dict[str, int], *,
               now: float, max_age_s: float, max_readings: int, codec: ChunkCodec,
               flush: bool) -> None:
    """Assign sequence numbers, grow open chunks, and seal what is full, due or flushed.

    Pure with respect to the buffer: only ``plan`` is written, so a failed commit
    leaves the open chunks and counters as they were.
    """
    age, cmax = max_age_s, max_readings
    replace = msgspec.structs.replace
    counters = plan.next_seq
    fresh: dict[Key, list[Reading]] = {}
    for a in plan.callers:
        out: list[Reading] = []
        for r in a.readings:
            dev = r.device_id
            n = counters.get(dev) or next_seq.get(dev, 1)
            counters[dev] = n + 1
            r2 = replace(r, seq=n)
            out.append(r2)
            fresh.setdefault((dev, int(r.priority)), []).append(r2)
        plan.results.append(out)
    for key, new in fresh.items():
        plan.floor = min(plan.floor, key[1])
        cur = open_chunks.get(key)
        buf = [*cur.readings, *new] if cur else list(new)
        deadline = cur.deadline if cur else now + age
        staged_from = len(buf) - len(new)
        if len(buf) >= cmax:
            whole = len(buf) - len(buf) % cmax
            plan.seal.extend(seal_chunk(buf[i:i + cmax], codec)
                             for i in range(0, whole, cmax))
            buf = buf[whole:]
            plan.clear_staging.add(key)
            staged_from, deadline = 0, now + age
        if buf[staged_from:]:
            plan.stage.append((key, codec.encode(buf[staged_from:])))
        plan.new_open[key] = OpenChunk(buf, deadline) if buf else None
    for key in [*open_chunks, *(k for k in plan.new_open if k not in open_chunks)]:
        op = plan.new_open[key] if key in plan.new_open else open_chunks[key]
        if op is not None and (flush or op.deadline <= now):
            plan.seal.append(seal_chunk(op.readings, codec))
            plan.floor = min(plan.floor, key[1])
            plan.clear_staging.add(key)
            plan.stage = [(k, b) for k, b in plan.stage if k != key]
            plan.new_open[key] = None


DEDUP_ROWS = 4096


async def write_plan(db: aiosqlite.Connection, plan: Plan, ledger: Ledger, fx: Effects, *,
                     now_ms: int, codec_id: int, clear_all_staging: bool = False,
                     dedup_keep_ms: int = 600_000, born_ms: int = 0,
                     dedup_keep_bytes: int = 128 * 1024,
                     chunk_ids: Sequence[int] = ()) -> None:
    """Write a plan's rows inside the caller's transaction, recording the effects.

    ``chunk_ids`` (one per sealed chunk) are the ids of the new chunk rows (see
    :func:`agent.buffer.footprint.chunk_id`); without them SQLite numbers the rows."""
    if clear_all_staging:
        await db.execute("DELETE FROM staging")
        fx.staging.update(dict.fromkeys(ledger.staging, 0))
    if plan.clear_staging:
        await db.executemany("DELETE FROM staging WHERE device_id = ? AND priority = ?",
                             list(plan.clear_staging))
        fx.staging.update(dict.fromkeys(plan.clear_staging, 0))
    if plan.seal:
        ids: Sequence[int | None] = chunk_ids or [None] * len(plan.seal)
        await db.executemany(
            "INSERT INTO chunks (id, device_id, priority, seq_first, seq_last, count, "
            "ts_first, ts_last, codec, checksum, nbytes, created_ms, payload, born_ms) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            [(i, c.device_id, int(c.priority), c.seq_first, c.seq_last, c.count,
              c.ts_first, c.ts_last, c.codec, c.checksum, len(c.payload), now_ms,
              c.payload, born_ms) for i, c in zip(ids, plan.seal, strict=True)])
        fx.inserted.extend((int(c.priority), len(c.payload), c.count)
                           for c in plan.seal)
    if plan.stage:
        await db.executemany(
            "INSERT INTO staging (device_id, priority, codec, checksum, payload) "
            "VALUES (?,?,?,?,?)",
            [(k[0], k[1], codec_id, zlib.crc32(b), b)
             for k, b in plan.stage])
        for k, b in plan.stage:
            base = fx.staging.get(k, ledger.staging.get(k, 0))
            fx.staging[k] = base + len(b)
    if plan.next_seq:
        await db.executemany(
            "INSERT INTO seqs (device_id, next_seq) VALUES (?, ?) ON CONFLICT(device_id)"
            " DO UPDATE SET next_seq = max(next_seq, excluded.next_seq)",
            list(plan.next_seq.items()))
    if plan.dedup:
        await db.executemany("INSERT INTO dedup_log (seen_ms, fps) VALUES (?, ?)",
                             [(now_ms, b) for b in plan.dedup])
        # bounded: rows of the last window (dedup_keep_ms), at most DEDUP_ROWS rows and
        # dedup_keep_bytes of fingerprints (the window's capacity, and a share of the
        # byte budget: they count against it like everything in the file)
        await db.execute("DELETE FROM dedup_log WHERE seen_ms < ? OR id <= "
                         "(SELECT max(id) FROM dedup_log) - ? OR id <= coalesce((SELECT id FROM"
                         " (SELECT id, sum(length(fps)) OVER (ORDER BY id DESC) AS held"
                         " FROM dedup_log) WHERE held > ? ORDER BY id DESC LIMIT 1), 0)",
                         (now_ms - dedup_keep_ms, DEDUP_ROWS, dedup_keep_bytes))
    if plan.states:
        await db.executemany(
            "INSERT INTO state (key, value) VALUES (?, ?) ON CONFLICT(key) "
            "DO UPDATE SET value = excluded.value", list(plan.states.items()))
