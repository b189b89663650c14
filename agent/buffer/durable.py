"""The durable buffer: SQLite (WAL) holding sealed compressed chunks, with group commit.

A reading is *accepted* once the group commit that holds it is durable (fsynced WAL).
Accepted readings of one (device, priority) accumulate in an open chunk whose new readings
are staged on disk as one small encoded blob per group commit; when the chunk is full or
old enough it is sealed into ``chunks`` and its staging rows go in the same transaction.
Only the write task and the uploader-side calls touch the database, one at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import sqlite3
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import aiosqlite
import msgspec
import structlog

from agent.buffer import evict, footprint, gaps, schema
from agent.buffer.config import BufferConfig
from agent.buffer.ledger import Effects, Key, Ledger, Removed
from agent.buffer.plan import Append, OpenChunk, Plan, build_plan, write_plan
from agent.buffer.types import BufferStats, StoredChunk
from agent.codec import codec_by_id, codec_by_name, seal_chunk
from pymigrate.clock import Clock
from pymigrate.errors import BufferFull, PyMigrateError
from pymigrate.types import Gap, Priority, Reading

log = structlog.get_logger("agent.buffer")

EventSink = Callable[[str, dict[str, Any]], None]
_DISK_FULL_RETRIES = 8
# how long a capacity learnt from SQLITE_FULL holds before the file may try to grow again
# (a quota raised, space freed elsewhere); a refusal then costs one retried commit
_LEARNT_CAP_S = 600.0


class _Corrupt(sqlite3.DatabaseError):
    """The file opened but failed its integrity check."""


def _is_corrupt(exc: sqlite3.DatabaseError) -> bool:
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    return isinstance(exc, _Corrupt) or code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or \
            "full" in str(exc).lower()
    return isinstance(exc, OSError) and exc.errno == errno.ENOSPC


async def _first(*aws: Coroutine[Any, Any, Any]) -> None:
    """Wait until the first of ``aws`` completes; cancel the others."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class DurableBuffer:
    """Durable, bounded store of accepted readings between the pipeline and the uploader.

    ``degrader`` (optional) compacts old LOW chunks (e.g. into aggregates) before they are
    evicted, when ``config.degrade_low_priority`` is set; it must keep device and priority.
    ``on_event(name, data)`` is told about evictions, quarantines and salvages.
    ``new_instance`` makes the instance id of a new buffer (default: random; a seeded
    simulation passes a reproducible one).
    """

    def __init__(self, config: BufferConfig, *, clock: Clock,
                 on_event: EventSink | None = None,
                 degrader: evict.Degrader | None = None,
                 new_instance: Callable[[], str] | None = None) -> None:
        self._cfg = config
        self._clock = clock
        self._on_event = on_event
        self._degrader = degrader if config.degrade_low_priority else None
        self._codec = codec_by_name(config.codec)
        self._path = Path(config.path)
        self._sidecar = schema.SeqSidecar(self._path)
        ttl = [config.retention_s.ttl_ms(p) for p in Priority]
        # retention deletes (with a gap record), or only marks a chunk expired for the
        # uploader to dead-letter in the cloud (retention_action = "dead_letter")
        dead_letter = config.retention_action == "dead_letter"
        self._ttl: list[int | None] = [None] * len(ttl) if dead_letter else ttl
        self._mark_ttl: list[int | None] = ttl if dead_letter else [None] * len(ttl)
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self._ledger = Ledger()
        self._next_seq: dict[str, int] = {}
        self._reserved: dict[str, int] = {}
        self._open: dict[Key, OpenChunk] = {}
        self._pending: deque[Append] = deque()
        self._pending_n = 0
        self._first_pending = 0.0
        self._states: dict[str, bytes] = {}
        self._waiters: list[asyncio.Future[None]] = []
        self._flush_req = False
        self._wake = asyncio.Event()  # there is work for the writer
        self._kick = asyncio.Event()  # ... and it should not wait for the window
        self._timer_evt = asyncio.Event()  # deadlines changed
        self._data_evt = asyncio.Event()  # replaced each time data becomes available
        self._stats = BufferStats()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._instance = ""
        self._base: dict[str, int] = {}
        self._salvage: schema.SalvageResult | None = None
        self._new_instance = new_instance or schema.new_instance_id
        self._dedup: list[bytes] = []
        self.dedup_keep_ms = 600_000  # the agent sets its dedup window here
        # fingerprints kept: the window's capacity, at most 1/16 of the byte budget
        self.dedup_keep_bytes = min(128 * 1024, config.budget_bytes // 16)
        self._layout = footprint.Layout.of(config.budget_bytes)
        self._age0 = 0  # the age clock when opened (ms, from meta 'age_ms')
        self._mono0 = 0.0
        self._ballast = False
        self._ballast_try = -1e18  # monotonic time of the last attempt to make it
        self._effective = config.budget_bytes
        self._disk_full = False
        # bytes the database file could hold when the storage refused to grow it although
        # budget and statvfs said there was room (see _learn_capacity), and when learnt
        self._learnt_cap: int | None = None
        self._learnt_at = 0.0
        self._chunk_n = 0  # the counter in chunk ids (footprint.chunk_id): last one used
        self._staging_pending = False  # staging left from a crash, not yet sealed
        self._disk_free: Callable[[Path], int | None] = footprint.disk_free

    # ---------------------------------------------------------------- lifecycle

    async def open(self) -> None:
        """Open (creating or migrating) the database; move aside and salvage a bad one."""
        self._path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self._path.exists() or self._path.stat().st_size == 0
        free = self._disk_free(self._path.parent)
        if free is not None and free < self._layout.wal_limit and \
                footprint.drop_ballast(self._path):
            # a restart on a full disk: the WAL needs room for its first frames
            log.warning("buffer.ballast_released", at="open", disk_free_bytes=free)
        try:
            self._db = await self._connect()
        except sqlite3.DatabaseError as exc:
            if not _is_corrupt(exc):
                raise  # locked, permissions, I/O: not a reason to move the file aside
            fresh = True
            await self._recover(exc)
            self._db = await self._connect()
        try:
            await self._load(fresh)
        except BaseException:
            db, self._db = self._db, None
            await db.close()
            raise
        self._tasks = [
            asyncio.create_task(self._writer(), name="buffer[writer]"),
            asyncio.create_task(self._timer(), name="buffer[timer]"),
        ]

    async def _connect(self) -> aiosqlite.Connection:
        # open once synchronously first: a file that cannot be opened fails here, before
        # aiosqlite starts a worker thread that would outlive the failure
        await asyncio.to_thread(schema.probe, self._path)
        db = await aiosqlite.connect(self._path, isolation_level=None)
        try:
            for p in schema.pragmas(self._cfg.cache_kib):
                await db.execute(p)
            rows = list(await db.execute_fetchall("PRAGMA page_size"))
            self._layout = footprint.Layout.of(self._cfg.budget_bytes, int(rows[0][0]))
            for p in self._layout.pragmas():
                await db.execute(p)
            rows = list(await db.execute_fetchall("PRAGMA quick_check"))
            if [tuple(r) for r in rows] != [("ok",)]:
                raise _Corrupt(f"integrity check failed: {[tuple(r) for r in rows[:3]]}")
            # after a crash the WAL may end where the disk is full: fold it into the
            # database so the next write starts the WAL over in the space it has
            with contextlib.suppress(sqlite3.Error):
                await db.execute("PRAGMA wal_checkpoint(RESTART)")
            rows = list(await db.execute_fetchall("PRAGMA user_version"))
            if int(rows[0][0]) != schema.SCHEMA_VERSION:
                # new or older: create/migrate. A current schema is not written to at all,
                # so a restart on a full disk opens.
                await self._migrate(db, int(rows[0][0]))
        except BaseException:
            await db.close()
            raise
        return db

    @staticmethod
    async def _migrate(db: aiosqlite.Connection, version: int) -> None:
        await db.executescript(schema.SCHEMA)
        cols = {str(r[1]) for r in await db.execute_fetchall("PRAGMA table_info(chunks)")}
        if "born_ms" not in cols:
            for stmt in schema.MIGRATIONS[2]:
                await db.execute(stmt)
        await db.execute(f"PRAGMA user_version = {schema.SCHEMA_VERSION}")
        log.info("buffer.schema_migrated", from_version=version, to=schema.SCHEMA_VERSION)

    async def _recover(self, exc: BaseException) -> None:
        aside = schema.move_aside(self._path, self._clock.time_ms())
        res = await asyncio.to_thread(schema.salvage, aside, self._path, self._cfg.cache_kib,
                                      self._clock.time_ms())
        self._salvage = res
        self._stats.moved_aside += 1
        self._stats.salvaged += res.salvaged
        self._stats.unreadable += res.unreadable
        log.error("buffer.moved_aside", path=str(self._path), moved_to=str(aside),
                  error=str(exc), salvaged=res.salvaged, staged=res.staged,
                  unreadable=res.unreadable, gaps=res.gaps)
        self._emit("salvaged", {"moved_to": str(aside), "salvaged": res.salvaged,
                                "staged": res.staged, "unreadable": res.unreadable})

    async def _load(self, fresh: bool) -> None:
        db = self._require_db()
        led = self._ledger
        rows = list(await db.execute_fetchall("SELECT value FROM meta WHERE key = 'age_ms'"))
        with contextlib.suppress(TypeError, ValueError, IndexError):
            self._age0 = int(rows[0][0])
        self._mono0 = self._clock.monotonic()
        for p, n, cnt, nb in await db.execute_fetchall(
                "SELECT priority, count(*), sum(count), sum(nbytes) FROM chunks GROUP BY 1"):
            if p not in range(len(Priority)):
                continue  # a damaged row: quarantined when take() reaches it
            led.chunks[p], led.readings[p] = int(n), int(cnt)
            led.payload += int(nb)
        await self._refresh_heads(set(range(len(Priority))))
        self._chunk_n = await self._last_chunk_n()
        self._next_seq = {str(d): int(n) for d, n in
                          await db.execute_fetchall("SELECT device_id, next_seq FROM seqs")}
        self._reserved = self._sidecar.read()
        lost: list[tuple[str, Gap]] = []
        if fresh:  # a new or moved-aside database continues above the recorded high water
            lost = self._account_fresh_start()
        try:
            await self._recover_staging()
        except (sqlite3.Error, OSError) as exc:
            if not _is_disk_full(exc):
                raise
            # the staged readings are durable where they are; they are sealed before any
            # new append is accepted (see _run), once there is room
            self._staging_pending = True
            self._disk_full = True
            log.warning("buffer.staging_recovery_deferred", reason="disk_full")
        if lost:
            async def body(db: aiosqlite.Connection, fx: Effects) -> None:
                await gaps.insert_gaps(db, lost, fx)

            await self._txn(body)
            log.error("buffer.gaps_recorded_at_start", gaps=[
                {"device": d, "seq_first": g.seq_first, "seq_last": g.seq_last,
                 "reason": g.reason, "detail": g.detail} for d, g in lost])
        rows = list(await db.execute_fetchall("SELECT count(*) FROM gaps"))
        led.gaps = int(rows[0][0]) if rows else 0
        await self._load_identity()
        await self._ensure_ballast()

    async def _last_chunk_n(self) -> int:
        """The highest counter in a chunk id held (chunks or quarantine), so new ids are
        never ids of rows still there: per id band, one index seek each."""
        db = self._require_db()
        n = 0
        for table in ("chunks", "quarantine"):
            for lo, hi in footprint.id_bands():
                rows = list(await db.execute_fetchall(
                    f"SELECT max(id) FROM {table} WHERE id >= ? AND id < ?", (lo, hi)))
                if rows and rows[0][0] is not None:
                    n = max(n, int(rows[0][0]) - lo)
        return n

    def age_ms(self) -> int:
        """The buffer's own clock (ms): monotonic time accumulated over every run of this
        buffer, kept in ``meta`` with each group commit. Retention measures age on it, so
        no jump of the wall clock can make data old."""
        return self._age0 + int((self._clock.monotonic() - self._mono0) * 1000)

    def _account_fresh_start(self) -> list[tuple[str, Gap]]:
        """A database that is new although numbering had begun (moved aside, deleted):
        continue above the recorded high water and say, as gap records, what the numbers
        in between are: never issued (``skipped``), or lost with an unreadable or
        missing database (``corrupt``/``lost``: every number not stored in the cloud)."""
        res = self._salvage
        now = self._clock.time_ms()
        out: list[tuple[str, Gap]] = []
        devices = set(self._reserved) | (set(self._next_seq) if res is not None else set())
        for dev in sorted(devices):
            have = self._next_seq.get(dev, 1)
            mark = max(have, self._reserved.get(dev, 0))
            self._next_seq[dev] = mark
            if res is None:  # no database at all: whatever it held is gone
                if mark > 1:
                    out.append((dev, Gap(1, mark - 1, mark - 1, "lost", now, [],
                                         "buffer database missing or empty at start")))
            elif res.unknown:
                if mark > 1:
                    out.append((dev, Gap(1, mark - 1, mark - 1, "corrupt", now, [],
                                         "unreadable rows in a database moved aside")))
            elif mark > have:
                out.append((dev, Gap(have, mark - 1, mark - have, "skipped", now,
                                     [(have, mark - 1)], "reserved, never issued")))
        return out

    async def _load_identity(self) -> None:
        """The stream identity: an instance id generated once per buffer (kept in ``meta``
        and in ``<db>.instance``, which survives a database moved aside) and, per device,
        the first sequence number of the stream (1 unless the instance began later)."""
        db = self._require_db()
        meta = {str(k): v for k, v in await db.execute_fetchall(
            "SELECT key, value FROM meta WHERE key = 'instance' OR key LIKE 'base:%'")}
        inst = meta.get("instance")
        self._base = {k[5:]: int(v) for k, v in meta.items() if k.startswith("base:")}
        if isinstance(inst, bytes | str) and inst:
            self._instance = inst.decode() if isinstance(inst, bytes) else inst
            self._write_instance_file()
            return
        kept = await asyncio.to_thread(schema.read_instance_file, self._path)
        self._instance = kept or self._new_instance()
        if not kept:  # a new stream: it starts where numbering stands now
            self._base = {d: n for d, n in self._next_seq.items() if n > 1}

        async def body(db: aiosqlite.Connection, fx: Effects) -> None:
            await db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('instance', ?)",
                             (self._instance,))
            await db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                                 [(f"base:{d}", n) for d, n in self._base.items()])

        await self._txn(body)
        self._write_instance_file()

    def _write_instance_file(self) -> None:
        try:
            schema.write_instance_file(self._path, self._instance)
        except OSError as exc:  # a full disk: the copy in the database is what counts
            log.warning("buffer.instance_file_failed", error=str(exc))

    @property
    def layout(self) -> footprint.Layout:
        """How the byte budget is shared out among the buffer's files."""
        return self._layout

    def watch_disk(self, free: Callable[[Path], int | None]) -> None:
        """Replace the free-space probe (default: ``statvfs`` of the data directory), e.g.
        by a simulated device's storage quota."""
        self._disk_free = free

    @property
    def instance(self) -> str:
        """This buffer's stream identity (see :meth:`_load_identity`)."""
        return self._instance

    def stream_of(self, device_id: str) -> tuple[str, int, int]:
        """(instance, first sequence number, highest sequence number issued) of a device."""
        return (self._instance, self._base.get(device_id, 1),
                max(0, self._next_seq.get(device_id, 1) - 1))

    async def _recover_staging(self) -> None:
        """Seal what earlier runs staged but never sealed (their open chunks)."""
        db = self._require_db()
        by_key: dict[Key, list[Reading]] = {}
        for dev, prio, codec, crc, payload in await db.execute_fetchall(
                "SELECT device_id, priority, codec, checksum, payload FROM staging ORDER BY id"):
            try:
                if zlib.crc32(payload) != crc:
                    raise PyMigrateError("staging checksum mismatch", reason="corrupt")
                rs = codec_by_id(codec).decode(payload, dev, Priority(prio))
            except (PyMigrateError, ValueError) as exc:
                self._stats.unreadable += 1
                log.error("buffer.staging_unreadable", device=dev, priority=prio, error=str(exc))
                continue
            by_key.setdefault((str(dev), int(prio)), []).extend(rs)
        if not by_key and not await db.execute_fetchall("SELECT 1 FROM staging LIMIT 1"):
            return
        plan = Plan(callers=[])
        for key, rs in by_key.items():
            rs.sort(key=lambda r: r.seq)
            step = self._cfg.chunk_max_readings
            plan.seal.extend(seal_chunk(rs[i:i + step], self._codec)
                             for i in range(0, len(rs), step))
            dev = key[0]
            plan.next_seq[dev] = max(plan.next_seq.get(dev, 1), self._next_seq.get(dev, 1),
                                     rs[-1].seq + 1)
        await self._commit_plan(plan, clear_all_staging=True)
        self._next_seq.update(plan.next_seq)
        log.info("buffer.staging_recovered", chunks=len(plan.seal),
                 readings=sum(c.count for c in plan.seal))

    async def close(self) -> None:
        """Seal open chunks, stop the background tasks and close the database."""
        if self._db is None:
            return
        self._closing = True  # refuse new appends; what is pending gets committed
        with contextlib.suppress(PyMigrateError):
            await self.flush()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for a in self._pending:
            if not a.fut.done():
                a.fut.set_exception(BufferFull("buffer closed", reason="closed"))
        self._pending.clear()
        for w in self._waiters:
            if not w.done():
                w.set_exception(BufferFull("buffer closed", reason="closed"))
        self._waiters.clear()
        db, self._db = self._db, None
        with contextlib.suppress(sqlite3.Error):
            await db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        await db.close()

    def _require_db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("buffer is not open")
        return self._db

    # ---------------------------------------------------------------- ingest side

    async def append(self, readings: Sequence[Reading], *,
                     state: tuple[str, bytes] | None = None,
                     dedup: bytes = b"") -> list[Reading]:
        """Accept ``readings``: returns them with ``seq`` set once they are durable.

        ``state`` (key, blob) is stored in the same transaction as the readings (e.g. the
        aggregation windows that include them), so a crash keeps both or neither; so are
        ``dedup`` (packed edge-dedup fingerprints of what the readings came from).
        Raises BufferFull when they cannot be stored even after eviction; then none of
        them was accepted.
        """
        self._require_db()
        if self._closing:
            raise BufferFull("buffer closed", reason="closed")
        if not readings:
            if dedup:
                self._dedup.append(bytes(dedup))
            if state is not None:
                await self.put_state(*state)
            elif dedup:
                await self._request(urgent=False)
            return []
        fut: asyncio.Future[list[Reading]] = asyncio.get_running_loop().create_future()
        if not self._pending:
            self._first_pending = self._clock.monotonic()
        self._pending.append(Append(readings, fut, self._clock.monotonic(),
                                    None if state is None else (state[0], bytes(state[1])),
                                    bytes(dedup)))
        self._pending_n += len(readings)
        self._wake.set()
        if self._pending_n >= self._cfg.commit_max_readings:
            self._kick.set()
        return await fut

    async def flush(self) -> None:
        """Seal every open chunk now (and commit anything pending)."""
        self._flush_req = True
        try:
            await self._request()
        except BufferFull as exc:
            if exc.reason != "disk_full":
                raise
            # the open chunks stay staged (durable): they are sealed once there is room
            log.warning("buffer.flush_deferred", reason="disk_full", open_chunks=len(self._open))

    async def put_state(self, key: str, value: bytes, *, urgent: bool = False) -> None:
        """Persist a small state blob; it rides on the next group commit (``urgent``: one
        that does not wait for the commit window)."""
        self._states[key] = bytes(value)
        await self._request(urgent=urgent)

    def stage_state(self, key: str, value: bytes) -> None:
        """Like :meth:`put_state` without waiting: the blob rides the next group commit
        (at the latest with the readings appended after this call)."""
        self._states[key] = bytes(value)

    def next_seqs(self) -> dict[str, int]:
        """Per device, the sequence number the next accepted reading will get (devices
        never seen start at 1)."""
        return dict(self._next_seq)

    async def get_state(self, key: str) -> bytes | None:
        """The last value stored with :meth:`put_state`, or None."""
        if key in self._states:
            return self._states[key]
        db = self._require_db()
        async with self._lock:
            rows = list(await db.execute_fetchall("SELECT value FROM state WHERE key = ?",
                                                  (key,)))
        return bytes(rows[0][0]) if rows else None

    async def recent_dedup(self) -> list[tuple[int, bytes]]:
        """Persisted edge-dedup fingerprints as (wall ms when committed, packed uint64),
        oldest first (see :meth:`append`)."""
        db = self._require_db()
        async with self._lock:
            rows = await db.execute_fetchall("SELECT seen_ms, fps FROM dedup_log ORDER BY id")
        return [(int(t), bytes(b)) for t, b in rows]

    async def _request(self, urgent: bool = True) -> None:
        self._require_db()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        if not self._pending:
            self._first_pending = self._clock.monotonic()
        self._wake.set()
        if urgent:
            self._kick.set()
        await fut

    async def _writer(self) -> None:
        window = self._cfg.commit_window_ms / 1000.0
        while True:
            await self._wake.wait()
            if window > 0 and not self._kick.is_set():
                deadline = self._first_pending + window
                if self._clock.monotonic() < deadline:
                    await _first(self._clock.sleep_until(deadline), self._kick.wait())
            async with self._lock:
                self._wake.clear()
                self._kick.clear()
                plan, flush = self._grab()
                try:
                    self._build(plan, flush)
                except Exception as exc:  # a reading the codec refuses: isolate its caller
                    log.error("buffer.build_failed", error=repr(exc))
                    await self._run_each(plan, flush)
                    continue
                await self._run(plan)

    async def _run_each(self, group: Plan, flush: bool) -> None:
        """Commit a group caller by caller, failing only the callers that cannot be built."""
        for a in group.callers:
            plan = Plan(callers=[a], states=dict([a.state]) if a.state is not None else {},
                        dedup=[a.dedup] if a.dedup else [])
            try:
                self._build(plan, False)
            except Exception as exc:
                if not a.fut.done():
                    a.fut.set_exception(exc)
                continue
            await self._run(plan)
        rest = Plan(callers=[], states=group.states, waiters=group.waiters,
                    dedup=[b for b in group.dedup if all(b is not a.dedup
                                                         for a in group.callers)])
        self._build(rest, flush)
        await self._run(rest)

    def _grab(self) -> tuple[Plan, bool]:
        """Take the pending work of one group commit (up to commit_max_readings)."""
        callers: list[Append] = []
        n = 0
        while self._pending and (not callers or n < self._cfg.commit_max_readings):
            a = self._pending.popleft()
            callers.append(a)
            n += len(a.readings)
        self._pending_n -= n
        if self._pending:  # left for the next commit, due a window after the oldest came
            self._first_pending = self._pending[0].since
            self._wake.set()
            if self._pending_n >= self._cfg.commit_max_readings:
                self._kick.set()
        states = self._states
        for a in callers:  # in arrival order: the last state of a key wins
            if a.state is not None:
                states[a.state[0]] = a.state[1]
        plan = Plan(callers=callers, states=states, waiters=self._waiters,
                    dedup=[*self._dedup, *(a.dedup for a in callers if a.dedup)])
        self._states, self._waiters, self._dedup = {}, [], []
        flush, self._flush_req = self._flush_req, False
        return plan, flush

    def _build(self, plan: Plan, flush: bool) -> None:
        build_plan(plan, self._open, self._next_seq, now=self._clock.monotonic(),
                   max_age_s=self._cfg.chunk_max_age_s, max_readings=self._cfg.chunk_max_readings,
                   codec=self._codec, flush=flush)

    async def _run(self, plan: Plan) -> None:
        """Commit a plan, making room on a full disk; settle its waiters."""
        try:
            if self._staging_pending:  # first seal what an earlier run left staged
                await self._recover_staging()
                self._staging_pending = False
            await self._reserve(plan.next_seq)
            for attempt in range(_DISK_FULL_RETRIES + 1):
                try:
                    await self._commit_plan(plan)
                    break
                except (sqlite3.Error, OSError) as exc:
                    if not _is_disk_full(exc) or attempt == _DISK_FULL_RETRIES:
                        raise
                    await self._learn_capacity()
                    need = max(plan.new_bytes, 4096) * (2 ** attempt)
                    if not await self._free_disk(need, plan.floor):
                        raise
        except Exception as exc:  # the writer must survive whatever one commit hits
            full = _is_disk_full(exc)
            err = BufferFull(f"cannot store readings: {exc!r}",
                             reason="disk_full" if full else "io_error")
            if full and not self._disk_full:
                log.error("buffer.disk_full", error=str(exc), readings=sum(
                    len(a.readings) for a in plan.callers), hint="no room left even after "
                    "eviction: ingest holds back until the uploader frees space")
            elif not full:
                log.error("buffer.append_failed", error=str(exc), readings=sum(
                    len(a.readings) for a in plan.callers))
            self._disk_full = self._disk_full or full
            for a in plan.callers:
                if not a.fut.done():
                    a.fut.set_exception(err)
            for w in plan.waiters:
                if not w.done():
                    w.set_exception(err)
            return
        if self._disk_full:
            self._disk_full = False
            log.warning("buffer.disk_full_cleared")
        for key, op in plan.new_open.items():
            if op is None:
                self._open.pop(key, None)
            else:
                if key not in self._open:
                    self._timer_evt.set()
                self._open[key] = op
        self._next_seq.update(plan.next_seq)
        for a, res in zip(plan.callers, plan.results):
            self._stats.accepted_total += len(res)
            if not a.fut.done():
                a.fut.set_result(res)
        for w in plan.waiters:
            if not w.done():
                w.set_result(None)

    async def _reserve(self, counters: dict[str, int]) -> None:
        """Record a new sequence high-water block in the sidecar before using it."""
        over = {d: n for d, n in counters.items() if n > self._reserved.get(d, 0)}
        if not over:
            return
        marks = dict(self._reserved)
        marks.update({d: n + schema.SeqSidecar.BLOCK for d, n in over.items()})
        await asyncio.to_thread(self._sidecar.write, marks)
        self._reserved = marks

    async def _commit_plan(self, plan: Plan, *, clear_all_staging: bool = False) -> None:
        now_ms = self._clock.time_ms()
        age = self.age_ms()
        free = await asyncio.to_thread(self._disk_free, self._path.parent)
        n = self._chunk_n
        ids = [footprint.chunk_id(c.priority, n + i) for i, c in enumerate(plan.seal, 1)]

        async def body(db: aiosqlite.Connection, fx: Effects) -> None:
            await write_plan(db, plan, self._ledger, fx, now_ms=now_ms, born_ms=age,
                             codec_id=self._codec.codec_id, clear_all_staging=clear_all_staging,
                             dedup_keep_ms=self.dedup_keep_ms,
                             dedup_keep_bytes=self.dedup_keep_bytes, chunk_ids=ids)
            await db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('age_ms', ?)",
                             (age,))
            await evict.expire(db, self._ledger, self._ttl, now_ms, fx, age_ms=age)
            incoming = plan.floor < len(Priority)
            floor = plan.floor if incoming else Priority.HIGH
            # the disk's limit makes room for incoming data only: a commit without new
            # readings (a flush, a restart) evicts nothing for a disk others filled
            await self._fit(db, fx, floor, free if incoming else None, now_ms)

        await self._txn(body)
        self._chunk_n = max(self._chunk_n, n + len(ids))
        await self._ensure_ballast(free)

    async def _fit(self, db: aiosqlite.Connection, fx: Effects, floor: int,
                   free: int | None, now_ms: int) -> None:
        """Evict (inside the transaction) until the database pages in use fit the budget's
        share for the database and what the disk has left (see :mod:`footprint`)."""
        lay = self._layout
        limit, reason = lay.target, "budget"
        if free is not None:
            wal = footprint.file_bytes(Path(f"{self._path}-wal"))
            room = free - self._cfg.disk_reserve_bytes - max(0, lay.wal_limit - wal)
            on_disk = footprint.file_bytes(self._path)
            # the file never shrinks: evicting only frees pages inside it for new rows,
            # so on a full disk keep HEADROOM of them free, no more
            disk_limit = on_disk + max(0, room) - footprint.HEADROOM
            if disk_limit < limit:
                limit, reason = disk_limit, "disk_full"
        # a learnt capacity holds for a while; then the file may try to grow again
        if self._learnt_cap is not None and \
                self._clock.monotonic() - self._learnt_at <= _LEARNT_CAP_S:
            learnt = footprint.learnt_target(self._learnt_cap, lay.page_size)
            if learnt < limit:
                limit, reason = learnt, "disk_full"
        self._effective = min(self._cfg.budget_bytes,
                              lay.budget - lay.target + max(limit, 0))
        pc = int(next(iter(await db.execute_fetchall("PRAGMA page_count")))[0])
        fl = int(next(iter(await db.execute_fetchall("PRAGMA freelist_count")))[0])
        excess = (pc - fl) * lay.page_size - limit
        if excess > 0:
            # one pass, by payload bytes: the oldest chunks of a priority fill pages of
            # their own (footprint.chunk_id), so as many pages free as bytes go, give or
            # take the page at the edge; re-measuring would evict more than needed, what
            # is left over is taken by the next commit, within HEADROOM
            await evict.make_room(db, excess, floor=floor, reason=reason, fx=fx,
                                  codec=self._codec, degrader=self._degrader,
                                  busy=set(self._ledger.inflight), now_ms=now_ms)

    async def _ensure_ballast(self, free: int | None = None) -> None:
        """Make the ballast file when it is missing and the disk has room to spare."""
        if self._ballast:
            return
        if footprint.ballast_path(self._path).exists():
            self._ballast = True
            return
        now = self._clock.monotonic()
        if now - self._ballast_try < 5.0:
            return
        self._ballast_try = now
        lay = self._layout
        if free is None:
            free = await asyncio.to_thread(self._disk_free, self._path.parent)
        if free is None or free < 2 * lay.ballast + lay.wal_limit + self._cfg.disk_reserve_bytes:
            return
        self._ballast = await asyncio.to_thread(footprint.make_ballast, self._path, lay.ballast)

    async def _learn_capacity(self) -> None:
        """A commit failed with SQLITE_FULL: the storage holds no more than the database
        has now, whatever the budget and ``statvfs`` say (a filesystem or container quota
        that ``statvfs`` does not show, SQLite's ``max_page_count``). For the next
        ``_LEARNT_CAP_S`` that size is the database's limit: :meth:`_fit` evicts by policy
        to keep a margin of it free (:func:`footprint.learnt_target`), so commits go on
        instead of failing one after another, and the effective budget says so.
        """
        db = self._require_db()
        rows = list(await db.execute_fetchall("PRAGMA page_count"))
        cap = int(rows[0][0]) * self._layout.page_size
        if cap >= self._layout.db_cap:
            return  # the budget's own limit: nothing to learn
        if cap != self._learnt_cap:
            log.warning("buffer.capacity_learnt", database_bytes=cap,
                        budget_share_bytes=self._layout.db_cap,
                        hint="the storage refused to grow the database below the budget")
        self._learnt_cap = cap
        self._learnt_at = self._clock.monotonic()

    async def _free_disk(self, need: int, floor: int) -> bool:
        """Evict ``need`` bytes by policy in a transaction of its own; False when nothing
        more may go."""
        async def body(db: aiosqlite.Connection, fx: Effects) -> None:
            await evict.make_room(db, need, floor=floor, reason="disk_full",
                                  fx=fx, codec=self._codec, busy=set(self._ledger.inflight),
                                  now_ms=self._clock.time_ms())

        try:
            fx = await self._txn(body)
        except (sqlite3.Error, OSError) as exc:
            if not _is_disk_full(exc):
                raise
            # the eviction's own writes (gap records) found no free page: the caller's
            # next attempt asks for twice as much, which empties whole pages first
            return True
        return bool(fx.removed)

    async def _txn(self, body: Callable[[aiosqlite.Connection, Effects],
                                        Awaitable[None]]) -> Effects:
        """Run ``body`` in one write transaction; apply its effects after COMMIT.

        On a full disk the ballast file is given back and the transaction tried once more
        (a delete needs WAL room too)."""
        try:
            return await self._txn_once(body)
        except (sqlite3.Error, OSError) as exc:
            if not _is_disk_full(exc):
                raise
            self._stats.disk_full_errors += 1
            if not await asyncio.to_thread(footprint.drop_ballast, self._path):
                raise
            self._ballast = False
            self._ballast_try = self._clock.monotonic()
            log.warning("buffer.ballast_released", at="write",
                        bytes=self._layout.ballast)
        try:
            return await self._txn_once(body)
        except (sqlite3.Error, OSError) as exc:
            if _is_disk_full(exc):
                self._stats.disk_full_errors += 1
            raise

    async def _txn_once(self, body: Callable[[aiosqlite.Connection, Effects],
                                             Awaitable[None]]) -> Effects:
        db = self._require_db()
        fx = Effects(gap_open=frozenset(self._ledger.gaps_open))
        await db.execute("BEGIN IMMEDIATE")
        try:
            await body(db, fx)
            await db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    await db.execute("ROLLBACK")
            raise
        self._stats.commits += 1
        stale = {r.priority for r in fx.removed} | {p for p, _, _ in fx.resized} | {
            p for p, _, _ in fx.inserted if self._ledger.head[p] is None}
        if stale:
            await self._refresh_heads(stale)
        self._apply(fx)  # no await from here to the caller's own bookkeeping
        return fx

    def _apply(self, fx: Effects) -> None:
        self._ledger.apply(fx)
        self._stats.degraded += fx.degraded
        self._stats.quarantined += fx.quarantined
        groups: dict[tuple[str, int], list[Removed]] = {}
        for r in fx.removed:
            if r.reason is not None:
                groups.setdefault((r.reason, r.priority), []).append(r)
        for (reason, prio), rs in groups.items():
            name = f"{reason}:{Priority(prio).name.lower()}"
            self._stats.evicted[name] = self._stats.evicted.get(name, 0) + len(rs)
            readings = sum(r.count for r in rs)
            self._stats.evicted_readings += readings
            data = {"reason": reason, "priority": Priority(prio).name.lower(),
                    "chunks": len(rs), "readings": readings,
                    "bytes": sum(r.nbytes for r in rs)}
            log.warning("buffer.evicted", **data)
            self._emit("evicted", data)
        self._stats.gaps_recorded += fx.gaps + fx.gaps_merged
        self._stats.gap_readings += fx.gap_readings
        if fx.inserted or fx.gaps:
            self._wake_data()

    async def _refresh_heads(self, prios: set[int]) -> None:
        db = self._require_db()
        for p in prios:
            rows = list(await db.execute_fetchall(
                "SELECT id, ts_first, born_ms FROM chunks WHERE priority = ? "
                "ORDER BY id LIMIT 1", (p,)))
            self._ledger.head[p] = (int(rows[0][0]), int(rows[0][1]), int(rows[0][2])) \
                if rows else None
        self._timer_evt.set()

    def _emit(self, name: str, data: dict[str, Any]) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(name, data)
        except Exception as exc:  # a broken observer must not break the buffer
            log.error("buffer.on_event_failed", name=name, error=repr(exc))

    # ---------------------------------------------------------------- deadlines

    def _next_deadline(self) -> float | None:
        now, age = self._clock.monotonic(), self.age_ms()
        ds = [o.deadline for o in self._open.values()]
        for p in Priority:
            ttl, head = self._ttl[p], self._ledger.head[p]
            if ttl is not None and head is not None:
                ds.append(now + (head[2] + ttl - age) / 1000.0 + 0.001)
        return min(ds) if ds else None

    async def _timer(self) -> None:
        """Seal open chunks by age and expire retention, sleeping on computed deadlines."""
        while True:
            self._timer_evt.clear()
            deadline = self._next_deadline()
            if deadline is None:
                await self._timer_evt.wait()
                continue
            if deadline > self._clock.monotonic():
                await _first(self._clock.sleep_until(deadline), self._timer_evt.wait())
                continue
            try:
                await self._request()
            except Exception as exc:
                log.error("buffer.maintenance_failed", error=repr(exc))
            nxt = self._next_deadline()
            if nxt is not None and nxt <= self._clock.monotonic():
                await self._clock.sleep(1.0)  # could not make progress: do not spin

    # ---------------------------------------------------------------- uploader side

    async def take(self, max_bytes: int, max_chunks: int = 64,
                   min_priority: Priority = Priority.LOW) -> list[StoredChunk]:
        """Pending chunks, highest priority then oldest first, within ``max_bytes``.

        Always returns at least one chunk when any is pending. Returned chunks are in
        flight until :meth:`ack` or :meth:`release`. A chunk failing its checksum is
        quarantined, counted and skipped.
        """
        db = self._require_db()
        out: list[StoredChunk] = []
        async with self._lock:
            await self._expire_due()
            while not out:
                busy = list(self._ledger.inflight)
                excl = f"AND id NOT IN ({','.join('?' * len(busy))})" if busy else ""
                heads = await db.execute_fetchall(
                    f"SELECT id, nbytes FROM chunks WHERE priority <= ? {excl} "
                    "ORDER BY priority, id LIMIT ?", (int(min_priority), *busy, max_chunks))
                ids: list[int] = []
                total = 0
                for cid, nbytes in heads:
                    if ids and total + nbytes > max_bytes:
                        break
                    ids.append(int(cid))
                    total += int(nbytes)
                if not ids:
                    return []
                out = await self._read_chunks(ids)
        for sc in out:
            self._ledger.inflight[sc.id] = int(sc.chunk.priority)
        return out

    async def _read_chunks(self, ids: list[int]) -> list[StoredChunk]:
        db = self._require_db()
        rows = await db.execute_fetchall(
            "SELECT id, attempts, created_ms, born_ms, device_id, priority, seq_first, "
            "seq_last, count, ts_first, ts_last, codec, payload, checksum FROM chunks WHERE id IN "
            f"({','.join('?' * len(ids))})", ids)
        age = self.age_ms()
        got: dict[int, StoredChunk] = {}
        bad: list[tuple[int, str]] = []
        for row in rows:
            cid = int(row[0])
            try:
                chunk = evict.chunk_of(tuple(row[4:]))
                if zlib.crc32(chunk.payload) != chunk.checksum:
                    raise PyMigrateError("checksum mismatch", reason="corrupt")
            except (PyMigrateError, ValueError, TypeError) as exc:
                bad.append((cid, str(exc)))
                continue
            held = max(0, age - int(row[3]))
            ttl = self._mark_ttl[chunk.priority]
            got[cid] = StoredChunk(id=cid, chunk=chunk, attempts=int(row[1]),
                                   created_ms=int(row[2]), age_ms=held,
                                   expired=ttl is not None and held >= ttl)
        if bad:
            try:
                await self._quarantine(bad)
            except (sqlite3.Error, OSError) as exc:
                if not _is_disk_full(exc):
                    raise
                log.warning("buffer.quarantine_deferred", reason="disk_full", chunks=len(bad))
        return [got[i] for i in ids if i in got]

    async def _quarantine(self, bad: list[tuple[int, str]]) -> None:
        now_ms = self._clock.time_ms()

        async def body(db: aiosqlite.Connection, fx: Effects) -> None:
            await evict.quarantine(db, bad, now_ms, fx)

        await self._txn(body)
        for cid, why in bad:
            log.error("buffer.quarantined", chunk_id=cid, error=why)
            self._emit("quarantined", {"id": cid, "error": why})

    async def _expire_due(self) -> None:
        now_ms, age = self._clock.time_ms(), self.age_ms()
        if any(t is not None and h is not None and h[2] <= age - t
               for t, h in zip(self._ttl, self._ledger.head)):
            async def body(db: aiosqlite.Connection, fx: Effects) -> None:
                await evict.expire(db, self._ledger, self._ttl, now_ms, fx, age_ms=age)

            try:
                await self._txn(body)
            except (sqlite3.Error, OSError) as exc:
                if not _is_disk_full(exc):
                    raise
                log.warning("buffer.expiry_deferred", reason="disk_full")

    async def take_gaps(self, device_id: str | None, limit: int = 256) -> list[gaps.GapRow]:
        """Pending gap records of ``device_id`` (None: of the device of the oldest one),
        oldest first, in flight until :meth:`ack` or :meth:`release` names them in
        ``gap_ids``."""
        led = self._ledger
        if led.gaps <= len(led.gaps_inflight):
            return []
        db = self._require_db()
        async with self._lock:
            if device_id is None:
                first = await gaps.read_gaps(db, exclude=led.gaps_inflight, limit=1)
                device_id = first[0].device_id if first else ""
            out = await gaps.read_gaps(db, exclude=led.gaps_inflight, limit=limit,
                                       device_id=device_id)
        led.gaps_inflight.update(g.id for g in out)
        led.gaps_open.difference_update(g.id for g in out)  # handed out: never merged into
        return out

    async def ack(self, ids: Sequence[int], gap_ids: Sequence[int] = ()) -> None:
        """Delivered: delete these chunks (and gap records the cloud stored) for good."""
        if not ids and not gap_ids:
            return
        marks = ",".join("?" * len(ids))
        gmarks = ",".join("?" * len(gap_ids))

        async def body(db: aiosqlite.Connection, fx: Effects) -> None:
            if ids:
                rows = await db.execute_fetchall(
                    f"DELETE FROM chunks WHERE id IN ({marks}) "
                    "RETURNING id, priority, nbytes, count", list(ids))
                fx.removed.extend(Removed(int(i), int(p), int(nb), int(c), None)
                                  for i, p, nb, c in rows)
            if gap_ids:
                gone = await db.execute_fetchall(
                    f"DELETE FROM gaps WHERE id IN ({gmarks}) RETURNING id", list(gap_ids))
                fx.gaps_acked += len(list(gone))

        async with self._lock:
            try:
                await self._txn(body)
            except (sqlite3.Error, OSError) as exc:
                if not _is_disk_full(exc):
                    raise
                # delivered but not deleted: they stay pending and go again (the cloud
                # stores each sequence number once); the uploader keeps running
                log.warning("buffer.ack_deferred", reason="disk_full", chunks=len(ids),
                            gaps=len(gap_ids))
        for i in ids:
            self._ledger.inflight.pop(i, None)
        self._ledger.gaps_inflight.difference_update(gap_ids)
        self._wake_data()

    async def give_up(self, ids: Sequence[int], reason: str, detail: str = "") -> int:
        """The uploader gives up on these chunks (e.g. larger than any uplink can carry):
        delete them and write their gap records in one transaction; returns readings."""
        if not ids:
            return 0
        now_ms = self._clock.time_ms()
        marks = ",".join("?" * len(ids))

        async def body(db: aiosqlite.Connection, fx: Effects) -> None:
            found = await gaps.gaps_for_chunk_ids(db, list(ids), reason, now_ms, detail)
            rows = await db.execute_fetchall(
                f"DELETE FROM chunks WHERE id IN ({marks}) "
                "RETURNING id, priority, nbytes, count", list(ids))
            await gaps.insert_gaps(db, found, fx)
            fx.removed.extend(Removed(int(i), int(p), int(nb), int(c), reason)
                              for i, p, nb, c in rows)

        async with self._lock:
            try:
                fx = await self._txn(body)
            except (sqlite3.Error, OSError) as exc:
                if not _is_disk_full(exc):
                    raise
                log.warning("buffer.give_up_deferred", reason="disk_full", chunks=len(ids))
                fx = Effects()  # kept (and retried later): nothing given up
        for i in ids:
            self._ledger.inflight.pop(i, None)
        self._wake_data()
        return fx.gap_readings

    def _wake_data(self) -> None:
        self._data_evt.set()
        self._data_evt = asyncio.Event()

    async def release(self, ids: Sequence[int], *, failed: bool = True,
                      gap_ids: Sequence[int] = ()) -> None:
        """Not delivered: put these chunks back at the head of their priority.

        ``failed=False`` gives back chunks that were never sent (no attempt counted)."""
        if gap_ids:
            self._ledger.gaps_inflight.difference_update(gap_ids)
            self._wake_data()
        ids = [i for i in ids if i in self._ledger.inflight]
        if not ids:
            return
        marks = ",".join("?" * len(ids))

        async def body(db: aiosqlite.Connection, fx: Effects) -> None:
            await db.execute(f"UPDATE chunks SET attempts = attempts + 1 WHERE id IN ({marks})",
                             ids)

        if failed:
            async with self._lock:
                try:
                    await self._txn(body)
                except (sqlite3.Error, OSError) as exc:
                    if not _is_disk_full(exc):
                        raise
                    # the attempt count is only a hint: do not fail the uploader over it
                    log.debug("buffer.release_not_counted", reason="disk_full")
        for i in ids:
            self._ledger.inflight.pop(i, None)
        self._data_evt.set()
        self._data_evt = asyncio.Event()

    async def wait_for_data(self, min_priority: Priority = Priority.LOW) -> None:
        """Sleep until a chunk of priority <= ``min_priority`` is pending (not in flight)."""
        while not self._ledger.available(int(min_priority)):
            await self._data_evt.wait()

    def stats(self) -> BufferStats:
        """A snapshot of sizes, backlog and counters."""
        led = self._ledger
        s = msgspec.structs.replace(self._stats, evicted=dict(self._stats.evicted))
        size = 0
        for f in (self._path, Path(f"{self._path}-wal")):
            with contextlib.suppress(OSError):
                size += os.path.getsize(f)
        s.bytes_on_disk = size
        s.state_bytes = footprint.usage(self._path)
        s.budget_bytes = self._cfg.budget_bytes
        s.effective_budget_bytes = self._effective
        free = self._disk_free(self._path.parent)
        # full: a commit failed for lack of room, or the filesystem has less free than
        # the reserve left for others (plus the ballast, once it was given back)
        short = self._cfg.disk_reserve_bytes + (0 if self._ballast else self._layout.ballast)
        s.disk_full = self._disk_full or (free is not None and free < short)
        s.ballast = self._ballast
        s.payload_bytes = led.total_bytes
        s.in_flight = len(led.inflight)
        s.chunks_pending = sum(led.chunks) - s.in_flight
        pending = list(led.readings)
        oldest = [h[1] for h in led.head if h is not None]
        for (_, prio), op in self._open.items():
            pending[prio] += len(op.readings)
            oldest.append(min(r.ts_ms for r in op.readings))
        s.readings_pending = {p.name.lower(): pending[p] for p in Priority}
        s.oldest_ts_ms = min(oldest) if oldest else None
        s.open_chunks = len(self._open)
        s.gaps_pending = led.gaps
        return s
