"""Durable buffer: corrupt chunks quarantined, unopenable files moved aside and salvaged,
sequence numbers never going backwards."""

from __future__ import annotations

import os
import random
import sqlite3
from pathlib import Path

from pymigrate.types import Priority
from tests.unit.buffer_helpers import Events, crash, drain, opened, readings

CH = 100


def _flip_payload(db: Path, chunk_id: int) -> None:
    con = sqlite3.connect(db)
    (payload,) = con.execute("SELECT payload FROM chunks WHERE id = ?", (chunk_id,)).fetchone()
    bad = bytearray(payload)
    bad[len(bad) // 2] ^= 0xFF
    con.execute("UPDATE chunks SET payload = ? WHERE id = ?", (bytes(bad), chunk_id))
    con.commit()
    con.close()


def _chunk_ids(db: Path) -> list[int]:
    """Ids of the stored chunks, oldest first within a priority (ids are banded by
    priority: agent.buffer.footprint.chunk_id)."""
    con = sqlite3.connect(db)
    ids = [int(r[0]) for r in con.execute("SELECT id FROM chunks ORDER BY id")]
    con.close()
    return ids


def _aside_files(d: Path) -> list[Path]:
    return list(d.glob("b.db.corrupt-*"))


async def test_corrupt_chunk_quarantined_others_delivered(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    async with opened(db, chunk_max_readings=CH) as buf:
        await buf.append(readings(5 * CH))
    bad = _chunk_ids(db)[1]
    _flip_payload(db, bad)
    ev = Events()
    async with opened(db, chunk_max_readings=CH, events=ev) as buf:
        got = await drain(buf)
        s = buf.stats()
        assert s.quarantined == 1 and s.chunks_pending == 0
        assert sorted(r.seq for r in got) == [*range(1, CH + 1), *range(2 * CH + 1, 5 * CH + 1)]
        assert ev.named("quarantined")[0]["id"] == bad
    con = sqlite3.connect(db)
    assert con.execute("SELECT id, seq_first FROM quarantine").fetchall() == [(bad, CH + 1)]
    con.close()


async def test_unparseable_chunk_header_quarantined(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    async with opened(db, chunk_max_readings=CH) as buf:
        await buf.append(readings(2 * CH))
    ids = _chunk_ids(db)
    con = sqlite3.connect(db)
    con.execute("UPDATE chunks SET priority = -1 WHERE id = ?", (ids[0],))
    con.commit()
    con.close()
    async with opened(db, chunk_max_readings=CH) as buf:
        got = await buf.take(1 << 20, max_chunks=1)  # the bad one is skipped, not returned
        assert [c.id for c in got] == [ids[1]]
        assert buf.stats().quarantined == 1


async def test_garbage_file_moved_aside_and_seq_continues(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    async with opened(db, chunk_max_readings=CH) as buf:
        first = await buf.append(readings(250))
    assert first[-1].seq == 250
    for side in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        if side.exists():
            side.unlink()
    db.write_bytes(random.Random(1).randbytes(16384))
    ev = Events()
    async with opened(db, chunk_max_readings=CH, events=ev) as buf:
        s = buf.stats()
        assert s.moved_aside == 1 and s.salvaged == 0
        assert len(_aside_files(tmp_path)) == 1
        nxt = await buf.append(readings(3))
        assert nxt[0].seq > 250  # never backwards, even on a fresh database
        assert [r.seq for r in nxt] == [nxt[0].seq, nxt[0].seq + 1, nxt[0].seq + 2]
        assert ev.named("salvaged")[0]["salvaged"] == 0
    async with opened(db, chunk_max_readings=CH) as buf:  # and the fresh one keeps counting
        assert (await buf.append(readings(1)))[0].seq == nxt[-1].seq + 1


async def test_deleted_database_continues_from_sidecar(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    async with opened(db) as buf:
        await buf.append(readings(10))
    db.unlink()
    async with opened(db) as buf:
        assert (await buf.append(readings(1)))[0].seq > 10


async def test_damaged_page_salvages_readable_chunks(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    async with opened(db, chunk_max_readings=CH) as buf:
        for i in range(30):
            await buf.append(readings(CH, noisy=True, seed=i, priority=Priority.HIGH))
        await buf.flush()
        assert buf._db is not None
        rows = await buf._db.execute_fetchall(
            "SELECT payload FROM chunks ORDER BY id LIMIT 1 OFFSET 14")
        marker = bytes(next(iter(rows))[0][:32])
    data = bytearray(db.read_bytes())
    page = data.index(marker) // 4096
    data[page * 4096:page * 4096 + 16] = b"\xff" * 16  # wreck the b-tree page header
    db.write_bytes(bytes(data))
    async with opened(db, chunk_max_readings=CH) as buf:
        s = buf.stats()
        assert s.moved_aside == 1
        assert s.salvaged >= 20 and s.unreadable >= 1
        assert s.salvaged + s.unreadable == 30
        got = await drain(buf)
        seqs = sorted(r.seq for r in got)
        assert len(seqs) == s.salvaged * CH and len(set(seqs)) == len(seqs)
        assert (await buf.append(readings(1)))[0].seq > 30 * CH


async def test_corrupt_staging_blob_counted(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    async with opened(db, chunk_max_readings=CH) as buf:
        await buf.append(readings(10, device="a"))
        await buf.append(readings(10, device="b"))
        await crash(buf)
    con = sqlite3.connect(db)
    con.execute("UPDATE staging SET checksum = checksum + 1 WHERE device_id = 'a'")
    con.commit()
    con.close()
    async with opened(db, chunk_max_readings=CH) as buf:
        assert buf.stats().unreadable == 1
        got = await drain(buf)
        assert {r.device_id for r in got} == {"b"}
        assert (await buf.append(readings(1, device="a")))[0].seq == 11


async def test_broken_event_sink_does_not_break_buffer(tmp_path: Path) -> None:
    def sink(name: str, data: object) -> None:
        raise RuntimeError("observer bug")

    db = tmp_path / "b.db"
    async with opened(db, chunk_max_readings=CH) as buf:
        await buf.append(readings(2 * CH))
    _flip_payload(db, _chunk_ids(db)[0])
    async with opened(db, chunk_max_readings=CH, events=sink) as buf:  # type: ignore[arg-type]
        got = await drain(buf)
        assert len(got) == CH and buf.stats().quarantined == 1


def test_sidecar_ignores_garbage(tmp_path: Path) -> None:
    from agent.buffer.schema import SeqSidecar

    sc = SeqSidecar(tmp_path / "x.db")
    assert sc.read() == {}
    sc.path.write_text("[1, 2]")
    assert sc.read() == {}
    sc.path.write_text("{not json")
    assert sc.read() == {}
    sc.write({"a": 5})
    assert sc.read() == {"a": 5}
    assert os.listdir(tmp_path) == ["x.db.seq"]


async def test_unopenable_but_not_corrupt_is_not_moved_aside(tmp_path: Path) -> None:
    import pytest

    from agent.buffer import DurableBuffer
    from pymigrate.clock import VirtualClock
    from tests.unit.buffer_helpers import config

    db = tmp_path / "b.db"
    db.mkdir()  # cannot be opened as a file: an environment problem, not corruption
    buf = DurableBuffer(config(db), clock=VirtualClock())
    with pytest.raises(sqlite3.OperationalError):
        await buf.open()
    assert _aside_files(tmp_path) == [] and db.is_dir()
