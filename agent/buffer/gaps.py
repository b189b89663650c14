"""The device side of the completeness ledger: gap records, written in the transaction
that gives the data up.

Whatever the buffer removes without a delivery (eviction by the byte budget or a full
disk, retention, quarantine, degrade-before-drop, a salvage that could not read
everything, a chunk the uploader gives up on) leaves a row in ``gaps`` in the same
transaction as the removal. The row names the exact sequence numbers when the chunk can
still be decoded (``runs``), else the chunk's range and count. Gap rows ride to the cloud
in batches like chunks and are deleted only when the cloud acks them, so "stored + gaps =
every sequence number issued" holds even through ``kill -9`` and full disks.

A week offline on a full disk evicts thousands of chunks: one row each would fill the
budget with gap records and push out the data they were meant to protect. A new record
is therefore folded into the newest pending record of the same device, reason and detail,
up to ``MERGE_MAX_RUNS`` runs per record, but only into one this process wrote and never
handed out (a record the cloud may have seen is never changed: the cloud keeps the first
version it got). :func:`read_gaps` hands out at most ``READ_MAX_RUNS`` runs at a time, so
decoding them stays small.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import aiosqlite
import msgspec

from agent.buffer.ledger import Effects
from agent.codec import open_chunk
from pymigrate.types import Chunk, Gap, Priority, seq_runs_of

__all__ = ["GAP_COLS", "GapRow", "chunk_gap", "insert_gaps", "read_gaps", "runs_blob"]

GAP_COLS = "device_id, seq_first, seq_last, count, reason, ts_ms, runs, detail"
MERGE_MAX_RUNS = 1024  # runs one record may hold after merging
READ_MAX_RUNS = 4096  # runs read_gaps hands out at once (at least one record)
_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(list[tuple[int, int]])


class GapRow(msgspec.Struct, frozen=True):
    """A pending gap record as stored on the device (``id`` for ack/release)."""

    id: int
    device_id: str
    gap: Gap


def _varint(out: bytearray, n: int) -> None:
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def runs_blob(runs: Sequence[tuple[int, int]]) -> bytes | None:
    """Compact, because a gap record must not outgrow the chunk it replaces (a full disk
    frees pages by evicting): varint (distance from the previous run, length) pairs,
    zlib-compressed. A chunk of one sensor among ten (600 isolated sequence numbers, a
    stride of 10) takes about 30 bytes."""
    if not runs:
        return None
    out = bytearray()
    prev = 0
    for a, b in runs:
        _varint(out, a - prev)
        _varint(out, b - a)
        prev = b
    return b"V" + zlib.compress(bytes(out), 6)


def runs_of_blob(blob: bytes) -> list[tuple[int, int]]:
    """Inverse of :func:`runs_blob` (also reads the older msgpack form)."""
    if not blob.startswith(b"V"):
        return [(int(a), int(b)) for a, b in _dec.decode(blob)]
    data = zlib.decompress(blob[1:], bufsize=1 << 16)
    runs: list[tuple[int, int]] = []
    prev = 0
    vals: list[int] = []
    n = shift = 0
    for byte in data:
        n |= (byte & 0x7F) << shift
        if byte & 0x80:
            shift += 7
            continue
        vals.append(n)
        n = shift = 0
        if len(vals) == 2:
            a = prev + vals[0]
            b = a + vals[1]
            runs.append((a, b))
            prev, vals = b, []
    return runs


def chunk_gap(chunk: Chunk, reason: str, ts_ms: int, detail: str = "") -> Gap:
    """The gap record of a chunk given up: exact sequence numbers when it decodes."""
    runs: list[tuple[int, int]] = []
    try:
        if zlib.crc32(chunk.payload) == chunk.checksum:
            runs = seq_runs_of([r.seq for r in open_chunk(chunk)])
    except Exception:  # undecodable: the range and count say what is known
        runs = []
    if runs and (runs[0][0] < chunk.seq_first or runs[-1][1] > chunk.seq_last
                 or sum(b - a + 1 for a, b in runs) != chunk.count):
        runs = []  # the payload disagrees with its header: trust neither, give the range
    return Gap(chunk.seq_first, chunk.seq_last, chunk.count, reason, ts_ms, runs, detail)


def chunk_from_row(row: Sequence[Any]) -> Chunk:
    """(device_id, priority, seq_first, seq_last, count, ts_first, ts_last, codec, payload,
    checksum) -> Chunk, tolerant of damaged values (used only to describe a gap)."""
    dev, prio, sf, sl, cnt, tf, tl, codec, payload, crc = row
    p = int(prio) if int(prio) in range(len(Priority)) else int(Priority.LOW)
    return Chunk(str(dev), Priority(p), int(sf), int(sl), int(cnt), int(tf or 0),
                 int(tl or 0), int(codec), bytes(payload or b""), int(crc))


def _merged_runs(a: Sequence[tuple[int, int]], b: Sequence[tuple[int, int]]
                 ) -> list[tuple[int, int]] | None:
    """Union of two disjoint run lists, or None when they overlap (not one record)."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted([*a, *b]):
        if out and lo <= out[-1][1]:
            return None
        if out and lo == out[-1][1] + 1:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def _fold(items: Iterable[tuple[str, Gap]]) -> list[tuple[str, Gap]]:
    """Records of one call with the same device, reason and detail folded together."""
    out: list[tuple[str, Gap]] = []
    last: dict[tuple[str, str, str], int] = {}
    for dev, g in items:
        k = (dev, g.reason, g.detail)
        i = last.get(k)
        if i is not None and g.runs and out[i][1].runs:
            prev = out[i][1]
            runs = _merged_runs(prev.runs, g.runs)
            if runs is not None and len(runs) <= MERGE_MAX_RUNS:
                out[i] = (dev, Gap(runs[0][0], runs[-1][1], prev.count + g.count, g.reason,
                                   max(prev.ts_ms, g.ts_ms), runs, g.detail))
                continue
        last[k] = len(out)
        out.append((dev, g))
    return out


async def _merge_into_pending(db: aiosqlite.Connection, dev: str, g: Gap,
                              open_ids: frozenset[int]) -> bool:
    """Fold ``g`` into the newest pending record of its kind; False when it cannot be."""
    if not g.runs:
        return False
    rows = list(await db.execute_fetchall(
        "SELECT id, count, ts_ms, runs FROM gaps WHERE device_id = ? AND reason = ? "
        "AND detail = ? ORDER BY id DESC LIMIT 1", (dev, g.reason, g.detail)))
    if not rows:
        return False
    gid, count, ts, blob = rows[0]
    if int(gid) not in open_ids or not blob:
        return False
    try:
        old = runs_of_blob(bytes(blob))
    except (msgspec.DecodeError, zlib.error, ValueError):
        return False
    runs = _merged_runs(old, g.runs)
    if runs is None or len(runs) > MERGE_MAX_RUNS:
        return False
    await db.execute("UPDATE gaps SET seq_first = ?, seq_last = ?, count = ?, ts_ms = ?, "
                     "runs = ? WHERE id = ?",
                     (runs[0][0], runs[-1][1], int(count) + g.count, max(int(ts), g.ts_ms),
                      runs_blob(runs), int(gid)))
    return True


async def insert_gaps(db: aiosqlite.Connection, items: Iterable[tuple[str, Gap]],
                      fx: Effects | None = None) -> int:
    """Write gap records inside the caller's transaction (folded into pending records
    of the same kind where they fit, see the module docstring); returns how many
    records were given, merged or not."""
    given = list(items)
    rows = []
    merged = readings = 0
    open_ids = fx.gap_open if fx is not None else frozenset()
    for dev, g in _fold(given):
        readings += g.count
        if open_ids and await _merge_into_pending(db, dev, g, open_ids):
            merged += 1
            continue
        rows.append((dev, g.seq_first, g.seq_last, g.count, g.reason, g.ts_ms,
                     runs_blob(g.runs), g.detail))
    for row in rows:
        for (gid,) in await db.execute_fetchall(
                f"INSERT INTO gaps ({GAP_COLS}) VALUES (?,?,?,?,?,?,?,?) RETURNING id", row):
            if fx is not None:
                fx.gap_new.append(int(gid))
    if fx is not None:
        fx.gaps += len(rows)
        fx.gaps_merged += len(given) - len(rows)
        fx.gap_readings += readings
    return len(given)


async def gaps_for_chunk_ids(db: aiosqlite.Connection, ids: Sequence[int], reason: str,
                             ts_ms: int, detail: str = "") -> list[tuple[str, Gap]]:
    """Gap records for chunk rows about to be deleted (read before the DELETE)."""
    if not ids:
        return []
    marks = ",".join("?" * len(ids))
    rows = await db.execute_fetchall(
        "SELECT device_id, priority, seq_first, seq_last, count, ts_first, ts_last, codec, "
        f"payload, checksum FROM chunks WHERE id IN ({marks}) ORDER BY id", list(ids))
    out: list[tuple[str, Gap]] = []
    for row in rows:
        c = chunk_from_row(tuple(row))
        out.append((c.device_id, chunk_gap(c, reason, ts_ms, detail)))
    return out


async def read_gaps(db: aiosqlite.Connection, *, exclude: Iterable[int] = (),
                    limit: int = 256, device_id: str | None = None) -> list[GapRow]:
    """Pending gap records, oldest first, not in ``exclude`` (those in flight)."""
    busy = list(exclude)
    where = []
    args: list[Any] = []
    if busy:
        where.append(f"id NOT IN ({','.join('?' * len(busy))})")
        args.extend(busy)
    if device_id is not None:
        where.append("device_id = ?")
        args.append(device_id)
    sql = f"SELECT id, {GAP_COLS} FROM gaps"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY id LIMIT ?"
    args.append(limit)
    out: list[GapRow] = []
    held = 0
    for gid, dev, sf, sl, cnt, reason, ts, runs, detail in await db.execute_fetchall(sql, args):
        try:
            rr = runs_of_blob(bytes(runs)) if runs else []
        except (msgspec.DecodeError, zlib.error, ValueError):
            rr = []  # a damaged runs blob: the range still accounts for the readings
        if out and held + len(rr) > READ_MAX_RUNS:
            break  # the rest on the next read: bounded memory and batch size
        held += len(rr)
        out.append(GapRow(int(gid), str(dev), Gap(int(sf), int(sl), int(cnt), str(reason),
                                                  int(ts), rr, str(detail or ""))))
    return out
