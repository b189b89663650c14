"""The store interface every cloud store implements (SQLite, PostgreSQL, InfluxDB, ...)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import msgspec

from pymigrate.types import Reading


class WriteResult(msgspec.Struct, frozen=True):
    """Outcome of one idempotent batch write."""

    written: int  # new readings stored
    duplicates: int  # readings already stored (by device + seq), not written again


class SeqRange(msgspec.Struct, frozen=True):
    seq_first: int
    seq_last: int


@runtime_checkable
class Store(Protocol):
    """Idempotent time-series store.

    ``write`` stores readings of one device in one transaction; a reading whose
    (device_id, seq) is already stored is counted as a duplicate and not written again.
    It returns only after the transaction committed: the ingest acks after that.
    """

    name: str

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def write(self, device_id: str, batch_id: str, readings: Sequence[Reading]) -> WriteResult:
        ...

    async def dead_letter(self, device_id: str, batch_id: str, reason: str, payload: bytes) -> None:
        ...

    async def query(self, device_id: str, sensor: str | None = None,
                    start_ms: int | None = None, end_ms: int | None = None) -> list[Reading]:
        ...

    async def count(self, device_id: str | None = None) -> int: ...
