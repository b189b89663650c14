"""A state blob given with an append is committed in the same transaction as its readings
(the aggregation windows that include them): in one group commit the last one wins."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.unit.buffer_helpers import opened, readings


async def test_state_rides_with_its_readings(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    async with opened(path, commit_window_ms=0) as buf:
        got = await buf.append(readings(5), state=("agg", b"after-5"))
        assert len(got) == 5
        stats = buf.stats()
        assert stats.accepted_total == 5
        # several appends in one group commit: the state of the last one is stored
        await asyncio.gather(buf.append(readings(3, device="d2"), state=("agg", b"first")),
                             buf.append(readings(3, device="d3"), state=("agg", b"last")))
        assert await buf.get_state("agg") == b"last"
        assert await buf.append([], state=("agg", b"no-readings")) == []
    async with opened(path) as buf:
        assert await buf.get_state("agg") == b"no-readings"
        assert buf.stats().readings_pending["normal"] == 11


async def test_release_counts_an_attempt_only_when_one_was_made(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    async with opened(path, chunk_max_readings=5) as buf:
        await buf.append(readings(10))
        first = await buf.take(max_bytes=1, max_chunks=1)
        await buf.release([first[0].id], failed=False)  # handed back unsent
        again = await buf.take(max_bytes=1, max_chunks=1)
        assert again[0].id == first[0].id and again[0].attempts == 0
        await buf.release([again[0].id])  # a failed send
        third = await buf.take(max_bytes=1, max_chunks=1)
        assert third[0].attempts == 1
