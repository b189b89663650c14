"""On-disk layout of the buffer, and the salvage of a database that cannot be opened.

Everything here is synchronous ``sqlite3``: it runs once at open time in a worker thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.buffer.footprint import id_bands

SCHEMA_VERSION = 3  # 3: chunks.born_ms (age on the buffer's own clock)

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
    degraded INTEGER NOT NULL DEFAULT 0, payload BLOB NOT NULL,
    born_ms INTEGER NOT NULL DEFAULT 0);
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
CREATE TABLE IF NOT EXISTS dedup_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT, seen_ms INTEGER NOT NULL, fps BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS gaps (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL, seq_first INTEGER NOT NULL, seq_last INTEGER NOT NULL,
    count INTEGER NOT NULL, reason TEXT NOT NULL, ts_ms INTEGER NOT NULL,
    runs BLOB, detail TEXT NOT NULL DEFAULT '');
"""

CHUNK_COLS = ("id, device_id, priority, seq_first, seq_last, count, ts_first, ts_last, "
              "codec, checksum, nbytes, created_ms, attempts, degraded, payload")
QUARANTINE_KEEP = 64  # newest quarantined rows kept for forensics; older ones dropped


MIGRATIONS = {  # from user_version -> statements bringing it to the next version
    2: ["ALTER TABLE chunks ADD COLUMN born_ms INTEGER NOT NULL DEFAULT 0"],
}


def pragmas(cache_kib: int) -> list[str]:
    """Connection settings: WAL, fsync on every commit, small fixed cache, no mmap."""
    # synchronous=FULL: in WAL mode NORMAL may lose the last commits on power loss, and a
    # reading counts as accepted once committed, so every group commit is fsynced.
    # locking_mode=EXCLUSIVE (set before WAL): one process owns the buffer, and SQLite
    # keeps the WAL index in memory instead of a -shm file: no file to create (or fail
    # to create) on a full disk, none outside the budget.
    return [
        "PRAGMA locking_mode=EXCLUSIVE",
        "PRAGMA journal_mode=WAL",
        "PRAGMA synchronous=FULL",
        f"PRAGMA cache_size=-{int(cache_kib)}",
        "PRAGMA temp_store=MEMORY",
        "PRAGMA mmap_size=0",
        "PRAGMA foreign_keys=OFF",
    ]


def probe(path: Path) -> None:
    """Open ``path`` and read its header: raises the sqlite3 error a real open would."""
    con = sqlite3.connect(path)
    try:
        # exclusive, as the buffer's own connection: no -shm file to create (a full disk)
        con.execute("PRAGMA locking_mode=EXCLUSIVE")
        con.execute("PRAGMA schema_version").fetchone()
    finally:
        con.close()


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
    staged: int = 0  # staging rows (accepted, unsealed readings) carried over
    gaps: int = 0  # gap records written for what could not be read
    unknown: int = 0  # rows whose sequence numbers could not even be read


_SALVAGE_GAP = ("INSERT INTO gaps (device_id, seq_first, seq_last, count, reason, ts_ms, runs,"
                " detail) VALUES (?,?,?,?,'corrupt',?,NULL,?)")
_COPY_TABLES = {  # table -> columns copied verbatim (row by row, bad rows skipped)
    "meta": "key, value",
    "state": "key, value",
    "dedup_log": "id, seen_ms, fps",
    "gaps": "id, device_id, seq_first, seq_last, count, reason, ts_ms, runs, detail",
}


def salvage(src: Path, dst: Path, cache_kib: int, now_ms: int = 0) -> SalvageResult:
    """Copy everything of ``src`` that can still be read and verified into a fresh ``dst``:
    sealed chunks, staging (accepted readings of open chunks), the state blobs (edge
    dedup and aggregation windows), meta (the stream identity) and pending gap records.

    Best effort: a file that is not a database at all salvages nothing. A chunk whose
    checksum does not match counts as unreadable and, when its header can be read, becomes
    a ``corrupt`` gap record for its sequence range. Per-device sequence counters that can
    be read are carried over so numbering never goes backwards.
    """
    res = SalvageResult(max_seq={})
    assert res.max_seq is not None
    out = sqlite3.connect(dst, isolation_level=None)
    try:
        for p in pragmas(cache_kib):
            out.execute(p)
        out.executescript(SCHEMA)
        out.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        out.execute("BEGIN")
        try:
            src_db = sqlite3.connect(f"file:{src}?mode=ro", uri=True)
        except sqlite3.Error:
            out.execute("COMMIT")
            return res
        try:
            _salvage_seqs(src_db, res.max_seq)
            for table, cols in _COPY_TABLES.items():
                for row in _rows(src_db, table, cols):
                    with contextlib.suppress(sqlite3.Error):
                        out.execute(f"INSERT OR REPLACE INTO {table} ({cols}) VALUES "
                                    f"({','.join('?' * len(row))})", row)
            for row in _rows(src_db, "staging",
                             "id, device_id, priority, codec, checksum, payload"):
                payload = row[-1]
                if not isinstance(payload, bytes) or zlib.crc32(payload) != row[4]:
                    res.unreadable += 1
                    res.unknown += 1  # a staged blob has no header: its seqs are unknown
                    continue
                out.execute("INSERT INTO staging (id, device_id, priority, codec, checksum, "
                            "payload) VALUES (?,?,?,?,?,?)", row)
                res.staged += 1
            for row in _readable_chunk_rows(src_db, res):
                payload = row[-1]
                if not isinstance(payload, bytes) or zlib.crc32(payload) != row[9]:
                    res.unreadable += 1
                    dev, first, last, count = row[1], row[3], row[4], row[5]
                    if isinstance(first, int) and isinstance(last, int) and 1 <= first <= last:
                        out.execute(_SALVAGE_GAP, (str(dev), first, last, int(count or 0),
                                                   now_ms, "chunk unreadable in salvage"))
                        res.gaps += 1
                    else:
                        res.unknown += 1
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


def _rows(src: sqlite3.Connection, table: str, cols: str) -> list[tuple[Any, ...]]:
    """Rows of a small table read one by one by rowid, so one bad page costs only its rows."""
    try:
        ids = [int(r[0]) for r in src.execute(f"SELECT rowid FROM {table} ORDER BY rowid")]
    except sqlite3.Error:
        return []
    out: list[tuple[Any, ...]] = []
    for i in ids:
        with contextlib.suppress(sqlite3.Error):
            row = src.execute(f"SELECT {cols} FROM {table} WHERE rowid = ?", (i,)).fetchone()
            if row is not None:
                out.append(tuple(row))
    return out


def _readable_chunk_rows(src: sqlite3.Connection, res: SalvageResult) -> list[tuple[Any, ...]]:
    """Rows of ``chunks`` read one by one, so one bad page costs only its rows."""
    try:
        ids = [int(r[0]) for r in src.execute("SELECT id FROM chunks ORDER BY id")]
    except sqlite3.Error:
        ids = []  # the index or the table b-tree may be damaged: probe each id band
        for lo, hi in id_bands():
            try:
                last = src.execute("SELECT max(id) FROM chunks WHERE id >= ? AND id < ?",
                                   (lo, hi)).fetchone()[0]
            except sqlite3.Error:
                res.unknown += 1
                continue
            if last is None:
                continue
            try:  # the band's first id narrows the probe when its pages can be read
                first = src.execute("SELECT min(id) FROM chunks WHERE id >= ? AND id < ?",
                                    (lo, hi)).fetchone()[0]
            except sqlite3.Error:
                first = None
            ids.extend(range(lo + 1 if first is None else int(first), int(last) + 1))
    rows: list[tuple[Any, ...]] = []
    for i in ids:
        try:
            row = src.execute(f"SELECT {CHUNK_COLS} FROM chunks WHERE id = ?", (i,)).fetchone()
        except sqlite3.Error:
            res.unreadable += 1
            res.unknown += 1
            continue
        if row is not None:
            rows.append(tuple(row))
    return rows


def instance_file(db_path: Path) -> Path:
    return Path(f"{db_path}.instance")


def new_instance_id() -> str:
    return uuid.uuid4().hex[:16]


def read_instance_file(db_path: Path) -> str | None:
    """The instance id kept beside the database, or None when absent or unreadable."""
    try:
        text = instance_file(db_path).read_text(encoding="ascii").strip()
    except (OSError, ValueError):
        return None
    return text if 8 <= len(text) <= 64 and text.isalnum() else None


def write_instance_file(db_path: Path, instance: str) -> None:
    path = instance_file(db_path)
    if read_instance_file(db_path) == instance:
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="ascii") as f:
        f.write(instance + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
