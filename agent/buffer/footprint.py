"""What the buffer keeps on disk, and how the byte budget is shared out among its files.

``buffer.budget_bytes`` bounds everything the buffer keeps beside its database: the
database file, its WAL, the sidecars (``.seq``, ``.instance`` and their ``.tmp``) and the
ballast file (``.reserve``). There is no ``-shm`` file: the buffer runs SQLite in
exclusive locking mode, which keeps the WAL index in memory. Quarantined chunks live in a
table of the database, so they are inside the database's share.

Layout of a budget ``B`` (see :class:`Layout`):

* WAL: checkpointed automatically once it holds ``wal_limit / 2`` of frames and truncated
  back to ``wal_limit`` (``journal_size_limit``), so it stays within ``wal_limit`` plus one
  transaction; ``wal_limit = clamp(B / 16, 64 KiB, 1 MiB)``.
* ballast: ``wal_limit`` bytes of zeros, given back to SQLite when the disk is full
  (so a restart on a full disk, or a delete that frees space, still has room for its WAL)
  and made again once space returns.
* sidecars: 12 KiB.
* database: the rest (``db_cap``) is its hard limit (``PRAGMA max_page_count``); eviction
  keeps the pages in use below ``db_cap - headroom`` (32 KiB for SQLite's transient needs:
  one group commit, the b-tree pages an eviction rewrites), measured inside the
  transaction from SQLite's own page counts, not estimated from payload sizes.

The margin: the data directory's buffer files stay within ``B`` plus what one
transaction can add to the WAL beyond its limit (a group commit's pages: with the
default ``commit_max_readings`` a few pages), which the benchmark measures
(``python -m bench fulldisk``: ``state_dir_peak_bytes``).

Free space is watched too (``statvfs``): the database may only grow into what the disk
has left minus ``buffer.disk_reserve_bytes``, so a disk another process fills makes the
buffer evict by its policy (reason ``disk_full``) instead of failing. Where the storage
refuses to grow while ``statvfs`` still shows room (a filesystem or container quota,
SQLite's ``max_page_count``), the buffer learns its capacity from the ``SQLITE_FULL``:
the database's size then is its limit (see ``DurableBuffer._learn_capacity``).

Row layout: chunk ids are banded by priority (:func:`chunk_id`). SQLite keeps a table's
rows in id order, so with ids in arrival order every page held chunks of every priority,
and evicting the lowest priority (even all of it) freed almost no page: a page returns to
the free list only once all its rows are gone, and new rows go at the end of the table.
The buffer then evicted far more than its budget asked, and under a hard cap could not
make room at all. Banded, each priority fills pages of its own, and removing its oldest
chunks (eviction, acks) empties whole pages that any new row can reuse.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

KIB = 1024
SIDECARS = 12 * KIB
HEADROOM = 32 * KIB
WAL_MIN = 64 * KIB
WAL_MAX = 1024 * KIB
MIN_BUDGET = 256 * KIB
ID_BITS = 40  # chunk ids: (priority + 1) << ID_BITS | n; band 0 holds older plain ids
ID_BANDS = 5  # the plain band and one per priority


@dataclass(frozen=True)
class Layout:
    """How a byte budget is shared out among the buffer's files."""

    budget: int
    page_size: int
    wal_limit: int
    ballast: int
    db_cap: int  # bytes the database file may reach (max_page_count * page_size)

    @classmethod
    def of(cls, budget: int, page_size: int = 4096) -> Layout:
        wal = min(WAL_MAX, max(WAL_MIN, budget // 16))
        ballast = wal
        db_cap = budget - wal - ballast - SIDECARS
        return cls(budget, page_size, wal, ballast, max(db_cap, 16 * page_size))

    @property
    def max_pages(self) -> int:
        return self.db_cap // self.page_size

    @property
    def autocheckpoint_pages(self) -> int:
        return max(4, self.wal_limit // 2 // self.page_size)

    @property
    def target(self) -> int:
        """Bytes of database pages in use that eviction keeps below."""
        return self.db_cap - HEADROOM

    def pragmas(self) -> list[str]:
        return [f"PRAGMA journal_size_limit={self.wal_limit}",
                f"PRAGMA wal_autocheckpoint={self.autocheckpoint_pages}",
                f"PRAGMA max_page_count={self.max_pages}"]


def learnt_target(cap: int, page_size: int) -> int:
    """Bytes of database pages in use that eviction keeps below when the storage turned
    out to hold only ``cap`` bytes of database: HEADROOM free for the next commits, less
    on a small database (a sixteenth, at least two pages), where it would cost a third of
    what the storage holds."""
    return cap - min(HEADROOM, max(2 * page_size, cap // 16))


def chunk_id(priority: int, n: int) -> int:
    """The id of the ``n``-th chunk sealed (one counter for every priority) when its
    priority is ``priority``: ids sort by priority, then by age."""
    return ((priority + 1) << ID_BITS) | n


def id_bands() -> list[tuple[int, int]]:
    """``[lo, hi)`` of every chunk id band: plain ids first, then one per priority."""
    return [(b << ID_BITS, (b + 1) << ID_BITS) for b in range(ID_BANDS)]


def own_files(db: Path) -> list[Path]:
    """Every file the buffer may keep for the database at ``db``."""
    s = str(db)
    return [db, Path(f"{s}-wal"), Path(f"{s}-shm"), Path(f"{s}-journal"), Path(f"{s}.seq"),
            Path(f"{s}.seq.tmp"), Path(f"{s}.instance"), Path(f"{s}.instance.tmp"),
            ballast_path(db)]


def ballast_path(db: Path) -> Path:
    return Path(f"{db}.reserve")


def file_bytes(path: Path) -> int:
    """Bytes ``path`` occupies on disk (allocated blocks; 0 when absent)."""
    try:
        st = os.stat(path)
    except OSError:
        return 0
    return max(st.st_blocks * 512, 0) if st.st_blocks else st.st_size


def usage(db: Path) -> int:
    """Bytes the buffer's own files occupy on disk."""
    return sum(file_bytes(p) for p in own_files(db))


def disk_free(path: Path) -> int | None:
    """Bytes free for an unprivileged writer on the filesystem of ``path`` (None: unknown)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def make_ballast(db: Path, size: int) -> bool:
    """Write the ballast file (zeros, fsynced); False when there is no room for it."""
    path = ballast_path(db)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(b"\0" * size)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        return False
    return True


def drop_ballast(db: Path) -> bool:
    """Give the ballast's bytes back to the filesystem; True if there was one."""
    try:
        ballast_path(db).unlink()
    except FileNotFoundError:
        return False
    except OSError:
        return False
    return True
