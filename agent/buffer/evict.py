"""Removal inside a transaction: retention expiry, byte budget, degrade-before-drop,
quarantine.

Order: lowest priority first, oldest first. The data that needs the room only pushes out
data of its own priority or less important (its ``floor``): LOW data never evicts NORMAL,
and CRITICAL data is only ever evicted by newer critical data. Every removal is recorded
in the transaction's :class:`Effects` with its reason, and leaves a gap record
(:mod:`agent.buffer.gaps`) in the same transaction: ``evicted`` (detail: budget or
disk_full), ``expired``, ``corrupt`` (quarantine) or ``degraded`` (the raw readings a
degrade-before-drop compaction replaced by aggregates).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Collection, Sequence
from typing import Any

import aiosqlite

from agent.buffer.gaps import gaps_for_chunk_ids, insert_gaps
from agent.buffer.ledger import Effects, Ledger, Removed
from agent.buffer.schema import QUARANTINE_KEEP
from agent.codec import ChunkCodec, open_chunk, seal_chunk
from pymigrate.types import Chunk, Gap, Priority, Reading, seq_runs_of

Degrader = Callable[[list[Reading]], list[Reading]]
_BATCH = 32


def chunk_of(row: Sequence[Any]) -> Chunk:
    """Build a Chunk from a row of (device_id, priority, seq_first, seq_last, count,
    ts_first, ts_last, codec, payload, checksum)."""
    dev, prio, sf, sl, cnt, tf, tl, codec, payload, crc = row
    return Chunk(device_id=str(dev), priority=Priority(int(prio)),
                 seq_first=int(sf), seq_last=int(sl), count=int(cnt),
                 ts_first=int(tf), ts_last=int(tl), codec=int(codec),
                 payload=bytes(payload), checksum=int(crc))


async def expire(db: aiosqlite.Connection, ledger: Ledger, ttl_ms: list[int | None],
                 now_ms: int, fx: Effects, *, age_ms: int) -> None:
    """Delete chunks older than their priority's retention.

    Age is measured on the buffer's own clock (``age_ms`` now, ``born_ms`` at seal:
    monotonic time accumulated across runs), never on the wall clock, so a clock jump
    cannot make data old. ``now_ms`` (wall) only stamps the gap records."""
    for p in Priority:
        ttl, head = ttl_ms[p], ledger.head[p]
        if ttl is None or head is None or head[2] > age_ms - ttl:
            continue
        due = [int(r[0]) for r in await db.execute_fetchall(
            "SELECT id FROM chunks WHERE priority = ? AND born_ms <= ?",
            (int(p), age_ms - ttl))]
        gaps = await gaps_for_chunk_ids(db, due, "expired", now_ms,
                                        f"retention {ttl // 1000} s")
        rows = await db.execute_fetchall(
            "DELETE FROM chunks WHERE priority = ? AND born_ms <= ? "
            "RETURNING id, nbytes, count", (int(p), age_ms - ttl))
        await insert_gaps(db, gaps, fx)
        fx.removed.extend(Removed(int(i), int(p), int(nb), int(c), "retention")
                          for i, nb, c in rows)


async def make_room(db: aiosqlite.Connection, excess: int, *, floor: int,
                    reason: str, fx: Effects, codec: ChunkCodec,
                    degrader: Degrader | None = None, busy: Collection[int] = (),
                    now_ms: int = 0) -> int:
    """Free at least ``excess`` bytes from priorities >= ``floor``, lowest first, oldest
    first; returns how many bytes could not be freed (>= 0).

    Within a priority, chunks whose upload is in flight (``busy``) go last: they are
    likely to be acked in a moment, and evicting them would count as lost what is
    delivered anyway.
    """
    for p in sorted(Priority, reverse=True):
        if p < floor:
            break
        for in_flight in (False, True):
            last = -1
            while excess > 0:
                rows = list(await db.execute_fetchall(
                    "SELECT id, nbytes, count, degraded FROM chunks WHERE priority = ? "
                    "AND id > ? ORDER BY id LIMIT ?", (int(p), last, _BATCH)))
                if not rows:
                    break
                last = int(rows[-1][0])
                victims: list[Removed] = []
                for cid, nbytes, count, degraded in rows:
                    if excess <= 0:
                        break
                    if (int(cid) in busy) != in_flight:
                        continue
                    if degrader is not None and p == Priority.LOW and not degraded:
                        saved = await _degrade(db, int(cid), fx, codec, degrader, now_ms)
                        if saved > 0:
                            excess -= saved
                            continue
                    victims.append(Removed(int(cid), int(p), int(nbytes), int(count), reason))
                    excess -= int(nbytes)
                if victims:
                    gaps = await gaps_for_chunk_ids(db, [v.id for v in victims], "evicted",
                                                    now_ms, reason)
                    # delete first: on a full disk the gap rows reuse the freed pages
                    await db.executemany("DELETE FROM chunks WHERE id = ?",
                                         [(v.id,) for v in victims])
                    await insert_gaps(db, gaps, fx)
                    fx.removed.extend(victims)
            if excess <= 0:
                break
        if excess <= 0:
            break
    return max(0, excess)


async def _degrade(db: aiosqlite.Connection, cid: int, fx: Effects, codec: ChunkCodec,
                   degrader: Degrader, now_ms: int = 0) -> int:
    """Replace a LOW chunk's readings by the degrader's compaction; returns bytes saved."""
    rows = list(await db.execute_fetchall(
        "SELECT device_id, priority, seq_first, seq_last, count, ts_first, ts_last, codec, "
        "payload, checksum FROM chunks WHERE id = ?", (cid,)))
    await db.execute("UPDATE chunks SET degraded = 1 WHERE id = ?", (cid,))
    try:
        old = chunk_of(tuple(rows[0]))
        raw = open_chunk(old)
        compact = degrader(raw)
        if not compact:
            return 0
        new = seal_chunk(compact, codec)
    except Exception:  # corrupt, or the degrader refused: the chunk is simply evicted
        return 0
    saved = len(old.payload) - len(new.payload)
    if saved <= 0:
        return 0
    dropped = seq_runs_of(sorted({r.seq for r in raw} - {r.seq for r in compact}))
    if dropped:
        n = sum(b - a + 1 for a, b in dropped)
        await insert_gaps(db, [(old.device_id, Gap(dropped[0][0], dropped[-1][1], n, "degraded",
                                                   now_ms, dropped, "replaced by aggregates"))],
                          fx)
    await db.execute(
        "UPDATE chunks SET seq_first=?, seq_last=?, count=?, ts_first=?, ts_last=?, codec=?, "
        "payload=?, checksum=?, nbytes=? WHERE id = ?",
        (new.seq_first, new.seq_last, new.count, new.ts_first, new.ts_last, new.codec,
         new.payload, zlib.crc32(new.payload), len(new.payload), cid))
    fx.resized.append((int(Priority.LOW), -saved, new.count - old.count))
    fx.degraded += 1
    return saved


async def quarantine(db: aiosqlite.Connection, bad: list[tuple[int, str]], now_ms: int,
                     fx: Effects) -> None:
    """Move chunks that failed verification to ``quarantine`` (newest few kept)."""
    for cid, why in bad:
        await insert_gaps(db, await gaps_for_chunk_ids(db, [cid], "corrupt", now_ms, why), fx)
        rows = list(await db.execute_fetchall(
            "SELECT priority, nbytes, count FROM chunks WHERE id = ?", (cid,)))
        await db.execute(
            "INSERT OR REPLACE INTO quarantine (id, device_id, priority, seq_first, "
            "seq_last, count, codec, checksum, reason, quarantined_ms, payload) "
            "SELECT id, device_id, priority, seq_first, seq_last, count, codec, "
            "checksum, ?, ?, payload FROM chunks WHERE id = ?", (why, now_ms, cid))
        await db.execute("DELETE FROM chunks WHERE id = ?", (cid,))
        prio, nbytes, count = rows[0]
        if prio in range(len(Priority)):
            fx.removed.append(Removed(cid, int(prio), int(nbytes), int(count), None))
        fx.quarantined += 1
    await db.execute(
        "DELETE FROM quarantine WHERE id NOT IN (SELECT id FROM quarantine "
        f"ORDER BY quarantined_ms DESC, id DESC LIMIT {QUARANTINE_KEEP})")
