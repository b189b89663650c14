"""Typed, frozen configuration of the durable buffer (phase one of the two-phase config)."""

from __future__ import annotations

import math

import msgspec

from agent.buffer.footprint import MIN_BUDGET
from agent.codec import CODECS, DEFAULT_CODEC
from pymigrate.errors import ConfigError
from pymigrate.types import Priority


class Retention(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Time to live of buffered data per priority, in seconds; 0 or None keeps forever.

    Age is counted on the buffer's own clock: monotonic time accumulated across runs and
    kept in the database, so a jump of the real-time clock (an RTC reset, NTP stepping
    after a week offline) never makes data old. Time the device is powered off does not
    count."""

    critical: float | None = None
    high: float | None = None
    normal: float | None = None
    low: float | None = None

    def ttl_ms(self, priority: Priority) -> int | None:
        """TTL of ``priority`` in milliseconds, or None for keep-forever."""
        v = getattr(self, priority.name.lower())
        return int(v * 1000) if v else None


RETENTION_ACTIONS = ("gap", "dead_letter")


class BufferConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Durable buffer settings; every field has a default.

    ``budget_bytes`` bounds every file the buffer keeps (database, WAL, sidecars, ballast:
    see :mod:`agent.buffer.footprint`); ``disk_reserve_bytes`` is left free on the
    filesystem for others (the buffer evicts rather than take it).
    ``path`` is resolved against the data directory by the caller. ``commit_window_ms``
    and ``commit_max_readings`` shape group commit; ``chunk_max_readings`` and
    ``chunk_max_age_s`` decide when an open chunk is sealed. ``degrade_low_priority``
    compacts old LOW chunks through the degrader passed to the buffer before evicting.
    ``retention_action`` says what retention (``retention_s`` here and
    ``retry.retention_s``) does with an expired chunk: ``gap`` deletes it with a gap
    record (reason ``expired``); ``dead_letter`` keeps it until the link is back, uploads
    it to the cloud's dead letters (reason ``expired``) and deletes it once the cloud
    acked it as dead-lettered.
    """

    path: str = "buffer.db"
    budget_bytes: int = 64 * 1024 * 1024
    commit_window_ms: int = 100
    commit_max_readings: int = 1000
    chunk_max_readings: int = 600
    chunk_max_age_s: float = 60.0
    codec: str = DEFAULT_CODEC
    retention_s: Retention = msgspec.field(default_factory=Retention)
    retention_action: str = "gap"
    cache_kib: int = 128
    disk_reserve_bytes: int = 64 * 1024
    degrade_low_priority: bool = False

    def __post_init__(self) -> None:
        def bad(key: str, problem: str) -> ConfigError:
            return ConfigError(f"buffer.{key}", problem)

        if not self.path:
            raise bad("path", "must not be empty")
        if self.budget_bytes < MIN_BUDGET:
            raise bad("budget_bytes", f"must be at least {MIN_BUDGET} (the database, its WAL "
                      f"and sidecars live in it), got {self.budget_bytes}")
        if self.disk_reserve_bytes < 0:
            raise bad("disk_reserve_bytes", f"must be >= 0, got {self.disk_reserve_bytes}")
        if not 0 <= self.commit_window_ms <= 10_000:
            raise bad("commit_window_ms", f"must be in 0..10000, got {self.commit_window_ms}")
        if self.commit_max_readings < 1:
            raise bad("commit_max_readings", f"must be >= 1, got {self.commit_max_readings}")
        if not 1 <= self.chunk_max_readings <= 100_000:
            raise bad("chunk_max_readings",
                      f"must be in 1..100000, got {self.chunk_max_readings}")
        if not (math.isfinite(self.chunk_max_age_s) and self.chunk_max_age_s > 0):
            raise bad("chunk_max_age_s", f"must be > 0, got {self.chunk_max_age_s}")
        if self.codec not in CODECS:
            raise bad("codec", f"unknown codec {self.codec!r} (known: {', '.join(sorted(CODECS))})")
        for p in Priority:
            v = getattr(self.retention_s, p.name.lower())
            if v is not None and not (math.isfinite(v) and v >= 0):
                raise bad(f"retention_s.{p.name.lower()}", f"must be >= 0 seconds, got {v}")
        if self.retention_action not in RETENTION_ACTIONS:
            raise bad("retention_action", f"must be \"gap\" (delete with a gap record) or "
                      f"\"dead_letter\" (upload to the cloud's dead letters), got "
                      f"{self.retention_action!r}")
        if not 64 <= self.cache_kib <= 1024 * 1024:
            raise bad("cache_kib", f"must be in 64..1048576, got {self.cache_kib}")
