"""Value types the buffer hands out: stored chunks and statistics."""

from __future__ import annotations

import msgspec

from pymigrate.types import Chunk


class StoredChunk(msgspec.Struct, frozen=True):
    """A sealed chunk as stored: row ``id`` (for ack/release), failed ``attempts`` so far,
    ``created_ms`` (wall time it was sealed: information only) and ``age_ms`` (how long
    it has been buffered, on the buffer's own clock, immune to wall-clock jumps).
    ``expired``: older than its priority's retention, kept to be dead-lettered
    (``retention_action = "dead_letter"``)."""

    id: int
    chunk: Chunk
    attempts: int
    created_ms: int
    age_ms: int = 0
    expired: bool = False


class BufferStats(msgspec.Struct):
    """Snapshot of the buffer: sizes, backlog, and counters since open.

    ``evicted`` maps ``"reason:priority"`` (e.g. ``"budget:low"``) to evicted chunk counts;
    ``commits`` counts write transactions (group commits, acks, maintenance).
    """

    bytes_on_disk: int = 0
    payload_bytes: int = 0
    chunks_pending: int = 0
    readings_pending: dict[str, int] = msgspec.field(default_factory=dict)
    oldest_ts_ms: int | None = None
    accepted_total: int = 0
    evicted: dict[str, int] = msgspec.field(default_factory=dict)
    evicted_readings: int = 0
    degraded: int = 0
    quarantined: int = 0
    salvaged: int = 0
    unreadable: int = 0
    moved_aside: int = 0
    in_flight: int = 0
    commits: int = 0
    open_chunks: int = 0
    gaps_recorded: int = 0  # gap records written since open (evicted, expired, corrupt...)
    gap_readings: int = 0  # sequence numbers those records account for
    gaps_pending: int = 0  # gap records not yet acknowledged by the cloud
    state_bytes: int = 0  # every file the buffer keeps, as allocated on disk
    budget_bytes: int = 0  # the configured budget
    effective_budget_bytes: int = 0  # min(budget, what the free space allows)
    disk_full: bool = False  # the last group commit failed for lack of space
    disk_full_errors: int = 0  # SQLITE_FULL / ENOSPC seen (each retried or reported)
    ballast: bool = False  # the ballast file is in place (given back on a full disk)
