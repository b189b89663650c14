"""An in-memory stand-in for the durable buffer (same upload API), for simulations and tests.

Same contract as ``agent.buffer``: ``take`` hands out the highest-priority oldest chunks
and marks them in flight, ``ack`` deletes, ``release`` puts them back at the head (and
counts a failed attempt), ``wait_for_data`` blocks on an event until a chunk that is not
in flight is available. Not durable, unbounded: never for production.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import msgspec

from pymigrate.clock import Clock
from pymigrate.types import Chunk, Priority


class StoredChunk(msgspec.Struct, frozen=True):
    """A chunk as the buffer hands it out."""

    id: int
    chunk: Chunk
    attempts: int
    created_ms: int
    age_ms: int = 0  # set by take(): monotonic time since put (never the wall clock)
    born: float = 0.0  # monotonic time of put


class MemoryBuffer:
    """Highest priority, then oldest first; event-driven ``wait_for_data``."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._items: dict[int, StoredChunk] = {}
        self._inflight: set[int] = set()
        self._next_id = 1
        self._waiters: list[tuple[Priority, asyncio.Future[None]]] = []
        self.acked: list[StoredChunk] = []  # in ack order
        self.takes = 0

    def put_nowait(self, chunk: Chunk, *, created_ms: int | None = None,
                   age_ms: int = 0) -> int:
        """Buffer ``chunk``; ``age_ms`` backdates it (as if buffered that long already)."""
        cid = self._next_id
        self._next_id += 1
        ms = self.clock.time_ms() if created_ms is None else created_ms
        born = self.clock.monotonic() - age_ms / 1000.0
        self._items[cid] = StoredChunk(cid, chunk, 0, ms, born=born)
        self._notify()
        return cid

    async def put(self, chunk: Chunk) -> int:
        return self.put_nowait(chunk)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def _ready(self, min_priority: Priority) -> list[StoredChunk]:
        return sorted((s for s in self._items.values()
                       if s.id not in self._inflight and s.chunk.priority <= min_priority),
                      key=lambda s: (s.chunk.priority, s.id))

    async def take(self, max_bytes: int, max_chunks: int = 64,
                   min_priority: Priority = Priority.LOW) -> list[StoredChunk]:
        self.takes += 1
        out: list[StoredChunk] = []
        total = 0
        for s in self._ready(min_priority):
            size = len(s.chunk.payload)
            if out and (total + size > max_bytes or len(out) >= max_chunks):
                break
            out.append(s)
            total += size
        now = self.clock.monotonic()
        out = [msgspec.structs.replace(s, age_ms=int((now - s.born) * 1000)) for s in out]
        self._inflight.update(s.id for s in out)
        return out

    async def ack(self, ids: Iterable[int], gap_ids: Iterable[int] = ()) -> None:
        """``gap_ids``: this buffer keeps no gap records (it never gives data up)."""
        for i in ids:
            s = self._items.pop(i, None)
            self._inflight.discard(i)
            if s is not None:
                self.acked.append(s)

    async def release(self, ids: Iterable[int], *, failed: bool = True,
                      gap_ids: Iterable[int] = ()) -> None:
        for i in ids:
            if i in self._inflight:
                self._inflight.discard(i)
                s = self._items[i]
                if failed:
                    self._items[i] = msgspec.structs.replace(s, attempts=s.attempts + 1)
        self._notify()

    async def wait_for_data(self, min_priority: Priority = Priority.LOW) -> None:
        while not self._ready(min_priority):
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append((min_priority, fut))
            try:
                await fut
            finally:
                if (min_priority, fut) in self._waiters:
                    self._waiters.remove((min_priority, fut))

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for _, fut in waiters:
            if not fut.done():
                fut.set_result(None)
