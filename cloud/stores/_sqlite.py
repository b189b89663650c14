"""Opening a cloud-side SQLite file the one way both the store and the ledger need."""

from __future__ import annotations

from pathlib import Path

import aiosqlite


async def open_sqlite(path: Path, *, busy_timeout_ms: int, schema: str) -> aiosqlite.Connection:
    """Autocommit connection (transactions are explicit ``BEGIN IMMEDIATE``), WAL, and
    ``synchronous=FULL``: the ingest acks after commit and the device then deletes its
    copy, so a commit must survive a power cut, not just a process crash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = await aiosqlite.connect(path, isolation_level=None)
    try:
        await db.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=FULL")
        await db.executescript(schema)
    except BaseException:
        await db.close()
        raise
    return db
