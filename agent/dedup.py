"""Edge deduplication: drop readings that sources re-send (QoS 1 redelivery, re-polled
registers, replayed files) before they get a sequence number.

Fingerprint
    ``xxh3_64`` over ``device_id``, ``sensor``, the *normalized timestamp* and the
    *quantized value*. The timestamp is the device's own one (``raw_ts_ms`` when set,
    else ``ts_ms``): a re-sent reading carries the same device time even if the clock
    model moved in between. It is divided by ``ts_quantum_ms`` (1 = exact milliseconds).
    The value is ``round(value / value_quantum)`` when ``value_quantum > 0``; with
    ``value_quantum == 0`` (default) the canonical float bits are used (``-0.0 == 0.0``,
    one NaN), so two readings differing in the last bit are both kept.

Window
    A fixed-capacity ring of (fingerprint, arrival time) plus an open-addressing table
    (linear probing, load <= 0.5, backward-shift deletion) of ring slots keyed by the
    fingerprint. Everything is allocated up front: memory does not grow with traffic
    (``stats()["bytes_per_entry"]`` is measured from the allocated buffers, about 24 B).
    An entry leaves when it is older than ``window_s`` (time bound, on the injected
    clock's monotonic time) or when ``max_entries`` newer ones arrived (count bound).
    Full 64-bit fingerprints are compared, so a false drop needs a 64-bit collision
    inside the window: probability about ``max_entries / 2**64`` per reading (< 1e-14
    at the default capacity).

Across restarts: the fingerprints of readings a source can deliver again (a QoS 1
message not yet acknowledged when the agent died, a replayed file) are committed in the
durable buffer in the same transaction as the readings they admitted (``filter(...,
admitted=...)`` collects them; :meth:`restore` puts them back at start), so a redelivery
after ``kill -9`` gets no new sequence number. Readings sampled from the gateway's own
clock cannot be redelivered and are not persisted.
"""

from __future__ import annotations

import logging
import math
import struct
import sys
from array import array
from collections.abc import Iterable, Sequence

import msgspec
import xxhash

from pymigrate.clock import Clock
from pymigrate.errors import ConfigError
from pymigrate.types import Reading

__all__ = ["DedupConfig", "Deduplicator", "fingerprint"]

# stdlib logging (rendered by pymigrate.logsetup in the agent): a library user or a
# benchmark that configures nothing gets nothing on stdout
log = logging.getLogger("pymigrate.agent.dedup")

_PACK = struct.Struct("<qd").pack
_NAN = float("nan")
_PREFIX_CACHE_MAX = 4096


class DedupConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[dedup]`` section: edge duplicate window."""

    enabled: bool = True
    window_s: float = 600.0  # time bound of the sliding window
    max_entries: int = 16384  # count bound (fixed, preallocated capacity)
    value_quantum: float = 0.0  # 0 = exact float bits; > 0 = absolute quantum
    ts_quantum_ms: int = 1  # timestamp normalization step

    def __post_init__(self) -> None:
        if not (self.window_s > 0 and math.isfinite(self.window_s)):
            raise ConfigError("dedup.window_s", f"must be a positive number, got {self.window_s}")
        if not 1 <= self.max_entries <= 50_000_000:
            raise ConfigError("dedup.max_entries",
                              f"must be between 1 and 50000000, got {self.max_entries}")
        if not (self.value_quantum >= 0 and math.isfinite(self.value_quantum)):
            raise ConfigError("dedup.value_quantum", f"must be >= 0, got {self.value_quantum}")
        if self.ts_quantum_ms < 1:
            raise ConfigError("dedup.ts_quantum_ms", f"must be >= 1, got {self.ts_quantum_ms}")


def fingerprint(reading: Reading, *, value_quantum: float = 0.0, ts_quantum_ms: int = 1) -> int:
    """64-bit fingerprint of a reading (see module docstring); stateless helper."""
    prefix = f"{reading.device_id}\x00{reading.sensor}\x00".encode()
    return xxhash.xxh3_64_intdigest(
        prefix + _key_tail(reading, value_quantum, ts_quantum_ms))


def _key_tail(r: Reading, value_quantum: float, ts_quantum_ms: int) -> bytes:
    ts = r.raw_ts_ms if r.raw_ts_ms is not None else r.ts_ms
    if ts_quantum_ms > 1:
        ts = ts // ts_quantum_ms
    v = r.value
    if value_quantum > 0.0 and math.isfinite(v):
        v = float(math.floor(v / value_quantum + 0.5))
    v += 0.0  # -0.0 -> 0.0
    if v != v:  # every NaN payload is the same NaN
        v = _NAN
    return _PACK(ts, v)


class Deduplicator:
    """Sliding-window duplicate filter (one per agent; not shared between threads)."""

    def __init__(self, config: DedupConfig, *, clock: Clock) -> None:
        self.config = config
        self._clock = clock
        cap = config.max_entries if config.enabled else 0
        self._cap = cap
        self._fps = array("Q", bytes(8 * cap))
        self._times = array("d", bytes(8 * cap))
        size = 1 << max(3, (2 * cap - 1).bit_length()) if cap else 0
        self._mask = size - 1
        self._table = array("i", [-1]) * size
        self._head = 0  # ring slot of the oldest entry
        self._count = 0
        self._prefixes: dict[tuple[str, str], bytes] = {}
        self._seen = 0
        self._dropped = 0
        self._expired = 0
        self._evicted = 0
        self._restored = 0

    # -- public API ---------------------------------------------------------------
    def filter(self, readings: Sequence[Reading],
               admitted: list[int] | None = None) -> list[Reading]:
        """Return the readings not seen within the window, in their original order.

        Each kept reading is remembered; a duplicate inside the same call is dropped too.
        ``admitted`` (optional) collects the fingerprints of the kept readings.
        """
        return self._filter(readings, [self._fingerprint(r) for r in readings]
                            if self._cap else [], admitted)

    def filter_keyed(self, readings: Sequence[Reading], key: int,
                     admitted: list[int] | None = None) -> list[Reading]:
        """:meth:`filter` for readings whose identity is their source message ``key``
        (stamped on arrival): reading ``i`` of the message is fingerprinted from
        (key, i, sensor), so the same message delivered again is dropped whole."""
        fps = [xxhash.xxh3_64_intdigest(f"{key}\x00{i}\x00{r.sensor}".encode())
               for i, r in enumerate(readings)] if self._cap else []
        return self._filter(readings, fps, admitted)

    def _filter(self, readings: Sequence[Reading], fps: list[int],
                admitted: list[int] | None) -> list[Reading]:
        if not self._cap:
            self._seen += len(readings)
            return list(readings)
        now = self._clock.monotonic()
        self._expire(now - self.config.window_s)
        out: list[Reading] = []
        dup: Reading | None = None
        for r, fp in zip(readings, fps):
            if self._add(fp, now):
                out.append(r)
                if admitted is not None:
                    admitted.append(fp)
            elif dup is None:
                dup = r
        self._seen += len(readings)
        if dup is not None:
            before = self._dropped
            self._dropped += len(readings) - len(out)
            if before < 10 or before // 1000 != self._dropped // 1000:  # throttled, counted
                log.info("duplicate readings dropped: %d (total %d), reason=duplicate, "
                         "e.g. sensor=%s ts_ms=%d", len(readings) - len(out), self._dropped,
                         dup.sensor[:120], dup.ts_ms)
        return out

    def remember(self, readings: Iterable[Reading]) -> None:
        """Add fingerprints without filtering (e.g. re-prime from the buffer at start)."""
        if not self._cap:
            return
        now = self._clock.monotonic()
        self._expire(now - self.config.window_s)
        for r in readings:
            self._add(self._fingerprint(r), now)

    def restore(self, entries: Iterable[tuple[int, float]]) -> int:
        """Put back persisted fingerprints as (fingerprint, age in seconds), oldest first;
        entries older than the window are skipped. Returns how many were restored."""
        if not self._cap:
            return 0
        now = self._clock.monotonic()
        n = 0
        for fp, age in entries:
            if 0 <= age < self.config.window_s:
                n += self._add(fp, now - age)
            elif age < 0:  # the wall clock went back: keep it for a full window
                n += self._add(fp, now)
        self._restored += n
        return n

    def clear(self) -> None:
        """Forget every entry (what a restart does)."""
        self._table = array("i", [-1]) * len(self._table)
        self._head = 0
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def stats(self) -> dict[str, float | int]:
        """Counters and measured memory of the window."""
        nbytes = (sys.getsizeof(self._fps) + sys.getsizeof(self._times)
                  + sys.getsizeof(self._table))
        return {
            "seen": self._seen,
            "dropped": self._dropped,
            "passed": self._seen - self._dropped,
            "entries": self._count,
            "capacity": self._cap,
            "expired": self._expired,
            "evicted": self._evicted,
            "restored": self._restored,
            "bytes": nbytes,
            "bytes_per_entry": round(nbytes / self._cap, 2) if self._cap else 0.0,
        }

    # -- internals ----------------------------------------------------------------
    def _fingerprint(self, r: Reading) -> int:
        key = (r.device_id, r.sensor)
        prefix = self._prefixes.get(key)
        if prefix is None:
            if len(self._prefixes) >= _PREFIX_CACHE_MAX:
                self._prefixes.clear()  # bounded cache; rebuilt on demand
            prefix = self._prefixes[key] = f"{r.device_id}\x00{r.sensor}\x00".encode()
        return xxhash.xxh3_64_intdigest(
            prefix + _key_tail(r, self.config.value_quantum, self.config.ts_quantum_ms))

    def _add(self, fp: int, now: float) -> bool:
        """Insert ``fp``; False when it is already in the window."""
        table, fps, mask = self._table, self._fps, self._mask
        i = fp & mask
        while True:
            s = table[i]
            if s < 0:
                break
            if fps[s] == fp:
                return False
            i = (i + 1) & mask
        if self._count == self._cap:
            self._evict_oldest()
            self._evicted += 1
            i = fp & mask  # the table may have shifted: find the free slot again
            while table[i] >= 0:
                i = (i + 1) & mask
        slot = (self._head + self._count) % self._cap
        fps[slot] = fp
        self._times[slot] = now
        table[i] = slot
        self._count += 1
        return True

    def _expire(self, horizon: float) -> None:
        times = self._times
        while self._count and times[self._head] < horizon:
            self._evict_oldest()
            self._expired += 1

    def _evict_oldest(self) -> None:
        table, fps, mask = self._table, self._fps, self._mask
        slot = self._head
        i = fps[slot] & mask
        # With FIFO deletion and backward shift the oldest entry always sits at its home
        # slot (every slot before it in its chain holds an older entry); kept for safety.
        while table[i] != slot:  # pragma: no cover
            i = (i + 1) & mask
        # backward-shift deletion keeps every probe chain unbroken without tombstones
        j = i
        while True:
            j = (j + 1) & mask
            t = table[j]
            if t < 0:
                break
            k = fps[t] & mask
            if (i <= j and (k <= i or k > j)) or (i > j and k <= i and k > j):
                table[i] = t
                i = j
        table[i] = -1
        self._head = (slot + 1) % self._cap
        self._count -= 1
