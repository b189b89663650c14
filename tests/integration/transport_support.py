"""Shared helpers for the transport contract tests: batches, a recording store, a sender."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import structlog

from agent.codec import seal_chunk
from cloud.stores.base import WriteResult
from cloud.stores.sqlite import SqliteStore
from pymigrate.envelope import Batch, encode_batch
from pymigrate.errors import PayloadRejected, ThrottledError, TransportError
from pymigrate.types import Ack, Priority, Reading
from transports.base import Uplink

T0 = 1_767_225_600_000


def make_batch(device_id: str, index: int, per_batch: int = 20,
               sensors: int = 2, first_seq: int | None = None) -> tuple[str, bytes, list[int]]:
    """Batch number ``index`` of ``device_id``: seqs ``index*per_batch+1 ..`` (or from
    ``first_seq``)."""
    first = index * per_batch + 1 if first_seq is None else first_seq
    seqs = list(range(first, first + per_batch))
    readings = [Reading(device_id, f"s{seq % sensors}", T0 + seq * 1000, _noise(seq),
                        Priority.NORMAL, seq) for seq in seqs]
    chunk = seal_chunk(readings, "columnar-zstd")
    batch_id = f"{device_id}-{index:05d}"
    payload = encode_batch(Batch(device_id, batch_id, [chunk], sent_ms=T0))
    return batch_id, payload, seqs


class RecordingStore(SqliteStore):
    """SQLite store that also records the seqs of every write that stored something."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self.writes: dict[str, list[list[int]]] = {}

    async def write(self, device_id: str, batch_id: str,
                    readings: Sequence[Reading], **kw: object) -> WriteResult:
        res = await super().write(device_id, batch_id, readings, **kw)  # type: ignore[arg-type]
        if res.written:
            self.writes.setdefault(device_id, []).append([r.seq for r in readings])
        return res


async def send_until_acked(uplink: Uplink, batch_id: str, payload: bytes, *,
                           timeout: float = 3.0, deadline_s: float = 40.0,  # noqa: ASYNC109
                           errors: list[str] | None = None) -> Ack:
    """Send like an uploader does: retry on TransportError/throttle until acked."""
    end = time.monotonic() + deadline_s
    while True:
        try:
            return await uplink.send(payload, batch_id=batch_id, timeout=timeout)
        except ThrottledError as exc:
            if errors is not None:
                errors.append("throttled")
            await asyncio.sleep(min(exc.retry_after_s, 0.2))
        except PayloadRejected:
            raise
        except TransportError as exc:
            if errors is not None:
                errors.append(type(exc).__name__)
            if time.monotonic() > end:
                raise
            await asyncio.sleep(0.05)


def _noise(seq: int) -> float:
    """A value that does not compress to nothing (so large batches need Block1)."""
    return float((seq * 2654435761) % 1_000_003) / 997.0


def plan_batches(device_id: str, n: int, *, big_every: int = 0, small: int = 20,
                 big: int = 1500) -> list[tuple[str, bytes, list[int]]]:
    """``n`` consecutive batches (contiguous seqs); every ``big_every``-th is large."""
    out = []
    seq = 1
    for i in range(n):
        per = big if big_every and i % big_every == 0 else small
        out.append(make_batch(device_id, i, per_batch=per, first_seq=seq))
        seq += per
    return out


@pytest.fixture(autouse=True)
def fresh_structlog() -> None:
    """Undo a structlog configuration an earlier test bound to its (now closed) captured
    stream (``setup_logging`` binds ``sys.stderr`` when called); the ingest logs
    rejections through structlog, which would raise instead of answering."""
    structlog.reset_defaults()
