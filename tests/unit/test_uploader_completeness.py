"""Uploader and the completeness protocol: gap records ride to the cloud and are deleted
only on its ack, an ack frees a batch only when id and counts match, a rejection the
cloud did not keep (or one caused by identity) keeps the data and blocks, a conflict is
reported."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from agent.buffer import BufferConfig, DurableBuffer
from agent.uploader import Uploader
from pymigrate.clock import WallClock
from pymigrate.types import Ack
from tests.unit.buffer_helpers import readings
from tests.unit.fakes_uplink import FakeUplink
from tests.unit.uploader_helpers import cfg, running


async def pump(clock: WallClock, seconds: float, until: Callable[[], bool] | None = None
               ) -> None:
    """Real time (the buffer's SQLite work runs in a thread), until ``until()``."""
    end = clock.monotonic() + seconds
    while clock.monotonic() < end:
        await asyncio.sleep(0.01)
        if until is not None and until():
            return


async def _agent(tmp_path: Path, **bkw: object) -> tuple[WallClock, DurableBuffer,
                                                          FakeUplink, Uploader]:
    clock = WallClock()
    kw: dict[str, object] = {"path": str(tmp_path / "b.db"), "commit_window_ms": 0,
                             "chunk_max_readings": 100}
    kw.update(bkw)
    buf = DurableBuffer(BufferConfig(**kw), clock=clock)  # type: ignore[arg-type]
    await buf.open()
    ul = FakeUplink(clock, delay_s=0.001)
    up = Uploader(buf, [ul], device_id="d", clock=clock, config=cfg(
        backoff_base_s=0.01, backoff_cap_s=0.05, breaker_open_base_s=0.05,
        breaker_open_cap_s=0.2, timeout_initial_s=2.0))
    return clock, buf, ul, up


async def test_gap_records_ride_along_and_are_deleted_on_the_ack(tmp_path: Path) -> None:
    clock, buf, ul, up = await _agent(tmp_path, budget_bytes=280 * 1024)
    try:
        for i in range(90):  # offline: the budget evicts, each eviction a gap record
            await buf.append(readings(100, device="d", noisy=True, seed=i))
        await buf.flush()
        s = buf.stats()
        assert s.gaps_pending > 0 and s.evicted_readings > 0
        async with running(up):
            await pump(clock, 20, lambda: buf.stats().gaps_pending == 0
                       and buf.stats().payload_bytes == 0)
        assert buf.stats().gaps_pending == 0 and buf.stats().chunks_pending == 0
        sent_gaps = [g for b in ul.delivered for g in b.gaps]
        assert sum(g.count for g in sent_gaps) == s.evicted_readings
        stored = {r.seq for b in ul.delivered for c in b.chunks
                  for r in __import__("agent.codec").codec.open_chunk(c)}
        given_up = {x for g in sent_gaps for a, b in g.runs for x in range(a, b + 1)}
        assert stored | given_up == set(range(1, 9001)) and not stored & given_up
        inst = buf.instance
        assert {b.instance for b in ul.delivered} == {inst}
        assert max(b.hwm for b in ul.delivered) == 9000
    finally:
        await buf.close()


async def test_an_ack_with_other_counts_frees_nothing(tmp_path: Path) -> None:
    clock, buf, ul, up = await _agent(tmp_path)
    real_send = ul.send

    async def lying_send(payload: bytes, *, batch_id: str, timeout: float) -> Ack:  # noqa: ASYNC109
        ack = await real_send(payload, batch_id=batch_id, timeout=timeout)
        return Ack(ack.batch_id, "ok", ack.t_recv_ms, ack.t_send_ms, count=ack.count - 1)

    ul.send = lying_send  # type: ignore[method-assign]
    try:
        await buf.append(readings(100, device="d"))
        await buf.flush()
        async with running(up):
            await pump(clock, 5, lambda: up.stats()["ack_mismatches"] > 0)
        assert buf.stats().chunks_pending == 1  # kept: the ack did not match the batch
        assert up.stats()["ack_mismatches"] >= 1
        ul.send = real_send  # type: ignore[method-assign]
        async with running(up):
            await pump(clock, 10, lambda: buf.stats().payload_bytes == 0)
        assert buf.stats().chunks_pending == 0
    finally:
        await buf.close()


async def test_identity_rejection_keeps_the_data_and_blocks(tmp_path: Path) -> None:
    clock, buf, ul, up = await _agent(tmp_path)
    real_send = ul.send

    async def refuse(payload: bytes, *, batch_id: str, timeout: float) -> Ack:  # noqa: ASYNC109
        return Ack(batch_id, "rejected", 0, 0, reason="device_mismatch", dead_lettered=False)

    ul.send = refuse  # type: ignore[method-assign]
    try:
        await buf.append(readings(300, device="d"))
        await buf.flush()
        async with running(up):
            await pump(clock, 5, lambda: bool(up.stats()["blocked"]))
            await pump(clock, 0.5)
        assert buf.stats().chunks_pending == 3  # nothing deleted
        st = up.stats()
        assert st["blocked"] == {"fake": "device_mismatch"}
        assert st["uplinks"]["fake"]["breaker"] in ("open", "half_open")
        ul.send = real_send  # type: ignore[method-assign]  # the operator fixed the config
        async with running(up):
            await pump(clock, 10, lambda: buf.stats().payload_bytes == 0)
        assert buf.stats().chunks_pending == 0 and up.stats()["blocked"] == {}
    finally:
        await buf.close()


async def test_a_conflict_is_acked_reported_and_blocks_identity(tmp_path: Path) -> None:
    clock, buf, ul, up = await _agent(tmp_path)
    real_send = ul.send

    async def conflict(payload: bytes, *, batch_id: str, timeout: float) -> Ack:  # noqa: ASYNC109
        ack = await real_send(payload, batch_id=batch_id, timeout=timeout)
        return Ack(ack.batch_id, "conflict", 0, 0, count=ack.count, conflicts=ack.count)

    ul.send = conflict  # type: ignore[method-assign]
    try:
        await buf.append(readings(100, device="d"))
        await buf.flush()
        async with running(up):
            await pump(clock, 5, lambda: buf.stats().payload_bytes == 0)
        st = up.stats()
        assert buf.stats().chunks_pending == 0  # the cloud keeps the copy apart
        assert st["conflicts"] == 1 and st["readings_conflicted"] == 100
        assert st["blocked"] == {"identity": "conflict"}
    finally:
        await buf.close()


async def test_gap_records_alone_probe_a_half_open_breaker(tmp_path: Path) -> None:
    """Only gap records left and the breaker opened by failures: the half-open probe must
    carry them (a probe that takes chunks only never closes the breaker again)."""
    clock, buf, ul, up = await _agent(tmp_path, budget_bytes=280 * 1024)
    try:
        for i in range(90):
            await buf.append(readings(100, device="d", noisy=True, seed=i))
        await buf.flush()
        while chunks := await buf.take(1 << 20, 64):  # the chunks went out another way
            await buf.ack([c.id for c in chunks])
        assert buf.stats().gaps_pending > 0 and buf.stats().chunks_pending == 0
        ul.default = "fail"
        async with running(up):

            def breaker() -> str:
                return str(up.stats()["uplinks"]["fake"]["breaker"])

            await pump(clock, 10, lambda: breaker() != "closed")
            assert buf.stats().gaps_pending > 0 and breaker() != "closed"
            ul.default = "ok"
            await pump(clock, 10, lambda: buf.stats().gaps_pending == 0)
        assert buf.stats().gaps_pending == 0
        assert sum(g.count for b in ul.delivered for g in b.gaps) == \
            buf.stats().evicted_readings
    finally:
        await buf.close()
