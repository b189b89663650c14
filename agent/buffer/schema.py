"""On-disk layout of the buffer, and the salvage of a database that cannot be opened.

Everything here is synchronous ``sqlite3``: it runs once at open time in a worker thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS seqs (device_id TEXT PRIMARY KEY, next_seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL, priority INTEGER NOT NULL,
    seq_first INTEGER NOT NULL, seq_last INTEGER NOT NULL, count INTEGER NOT NULL,
    ts_first INTEGER NOT NULL, ts_last INTEGER NOT NULL,
    codec INTEGER NOT NULL, checksum INTEGER NOT NULL, nbytes INTEGER NOT NULL,
    created_ms INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    degraded INTEGER NOT NULL DEFAULT 0, payload BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_prio ON chunks (priority, id);
CREATE TABLE IF NOT EXISTS staging (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL, priority INTEGER NOT NULL,
    codec INTEGER NOT NULL, checksum INTEGER NOT NULL, payload BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS staging_key ON staging (device_id, priority, id);
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY, device_id TEXT, priority INTEGER, seq_first INTEGER,
    seq_last INTEGER, count INTEGER, codec INTEGER, checksum INTEGER,
    reason TEXT NOT NULL, quarantined_ms INTEGER NOT NULL, payload BLOB);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value BLOB NOT NULL);
"""

CHUNK_COLS = ("id, device_id, priority, seq_first, seq_last, count, ts_first, ts_last, "
              "codec, checksum, nbytes, created_ms, attempts, degraded, payload")
QUARANTINE_KEEP = 64  # newest quarantined rows kept for forensics; older ones dropped


def pragmas(cache_kib: int) -> list[str]:
    """Connection settings: WAL, fsync on every commit, small fixed cache."""
    # synchronous=FULL: in WAL mode NORMAL may lose the last commits on power loss, and a
    # reading counts as accepted once committed, so every group commit is fsynced.
    return [
        "PRAGMA journal_mode=WAL",
        "PRAGMA synchronous=FULL",
        f"PRAGMA cache_size=-{int(cache_kib)}",
        "PRAGMA temp_store=MEMORY",
        "PRAGMA mmap_size=0",
        "PRAGMA wal_autocheckpoint=256",
        "PRAGMA journal_size_limit=1048576",
        "PRAGMA foreign_keys=OFF",
    ]


def aside_name(path: Path, now_ms: int) -> Path:
    """Where an unopenable database is moved: ``<path>.corrupt-<ts>``."""
    return path.with_name(f"{path.name}.corrupt-{now_ms}")


def move_aside(path: Path, now_ms: int) -> Path:
    """Rename the database and its WAL/SHM files out of the way; returns the new path."""
    dest = aside_name(path, now_ms)
    n = 0
    while dest.exists():
        n += 1
        dest = aside_name(path, now_ms + n)
    os.replace(path, dest)
    for suffix in ("-wal", "-shm"):
        side = Path(f"{path}{suffix}")
        if side.exists():
            os.replace(side, Path(f"{dest}{suffix}"))
    return dest


@dataclass
class SalvageResult:
    salvaged: int = 0
    unreadable: int = 0
    max_seq: dict[str, int] | None = None


def salvage(src: Path, dst: Path, cache_kib: int) -> SalvageResult:
    """Copy every chunk of ``src`` that can still be read and verified into a fresh ``dst``.

    Best effort: a file that is not a database at all salvages nothing. Chunks whose
    checksum does not match count as unreadable. Per-device sequence counters that can be
    read are carried over so numbering never goes backwards.
    """
    res = SalvageResult(max_seq={})
    assert res.max_seq is not None
    out = sqlite3.connect(dst, isolation_level=None)
    try:
        for p in pragmas(cache_kib):
            out.execute(p)
        out.executescript(SCHEMA)
        out.execute("BEGIN")
        try:
            src_db = sqlite3.connect(f"file:{src}?mode=ro", uri=True)
        except sqlite3.Error:
            out.execute("COMMIT")
            return res
        try:
            _salvage_seqs(src_db, res.max_seq)
            for row in _readable_chunk_rows(src_db, res):
                payload = row[-1]
                if not isinstance(payload, bytes) or zlib.crc32(payload) != row[9]:
                    res.unreadable += 1
                    continue
                out.execute(f"INSERT INTO chunks ({CHUNK_COLS}) VALUES "
                            "(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", row)
                dev, last = str(row[1]), int(row[4])
                res.max_seq[dev] = max(res.max_seq.get(dev, 0), last + 1)
                res.salvaged += 1
        finally:
            src_db.close()
        out.executemany(
            "INSERT INTO seqs (device_id, next_seq) VALUES (?, ?) ON CONFLICT(device_id) "
            "DO UPDATE SET next_seq = max(next_seq, excluded.next_seq)",
            list(res.max_seq.items()))
        out.execute("COMMIT")
    finally:
        out.close()
    return res


def _salvage_seqs(src: sqlite3.Connection, into: dict[str, int]) -> None:
    with contextlib.suppress(sqlite3.Error):
        for dev, nxt in src.execute("SELECT device_id, next_seq FROM seqs"):
            into[str(dev)] = max(into.get(str(dev), 0), int(nxt))


def _readable_chunk_rows(src: sqlite3.Connection, res: SalvageResult) -> list[tuple[Any, ...]]:
    """Rows of ``chunks`` read one by one, so one bad page costs only its rows."""
    try:
        ids = [int(r[0]) for r in src.execute("SELECT id FROM chunks ORDER BY id")]
    except sqlite3.Error:
        try:  # the index or the table b-tree may be damaged: probe the id range
            hi = src.execute("SELECT max(id) FROM chunks").fetchone()[0] or 0
            ids = list(range(1, int(hi) + 1))
        except sqlite3.Error:
            return []
    rows: list[tuple[Any, ...]] = []
    for i in ids:
        try:
            row = src.execute(f"SELECT {CHUNK_COLS} FROM chunks WHERE id = ?", (i,)).fetchone()
        except sqlite3.Error:
            res.unreadable += 1
            continue
        if row is not None:
            rows.append(tuple(row))
    return rows


class SeqSidecar:
    """High-water marks of per-device sequence numbers in ``<db>.seq``, written atomically.

    The buffer reserves sequence numbers in blocks and records the end of each block here
    before committing any number of it, so a database that had to be moved aside (or was
    deleted) never makes numbering go backwards: a fresh database continues above it.
    """

    BLOCK = 100_000

    def __init__(self, db_path: Path) -> None:
        self.path = Path(f"{db_path}.seq")

    def read(self) -> dict[str, int]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {str(k): int(v) for k, v in data.items() if isinstance(v, int)}

    def write(self, marks: dict[str, int]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(marks, f, separators=(",", ":"), sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        with contextlib.suppress(OSError):  # make the rename itself durable
            fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
