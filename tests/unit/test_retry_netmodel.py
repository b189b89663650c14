"""The simulated network (loss, latency, retransmission, outage), its uplink, and the
retry bench end to end on a short run."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable

import pytest

from bench import retry as bench_retry
from pymigrate.clock import VirtualClock
from pymigrate.envelope import Batch, encode_batch
from pymigrate.errors import ThrottledError, TransportError
from pymigrate.types import Ack
from simulators.netmodel import NetModel, SimCloud, SimulatedUplink, advance_settled
from tests.unit.uploader_helpers import chunk


def test_loss_rate_matches_the_model() -> None:
    m = NetModel(loss=0.2, rng=random.Random(1))
    n = 4000
    ok = sum(m.exchange(500).response_ok for _ in range(n))
    assert abs(ok / n - 0.8**2) < 0.03  # one request packet, one response packet
    big = sum(m.exchange(5 * 1200).request_ok for _ in range(n))
    assert abs(big / n - 0.8**5) < 0.03
    with pytest.raises(ValueError):
        NetModel(loss=1.0)


def test_link_retransmissions_recover_losses_at_a_time_cost() -> None:
    m = NetModel(loss=0.3, link_retries=3, link_rto_s=1.0, rng=random.Random(2))
    runs = [m.exchange(800) for _ in range(2000)]
    assert sum(r.response_ok for r in runs) / len(runs) > 0.97
    slow = [r.duration_s for r in runs if r.duration_s > 1.0]
    assert slow and max(r.wire_bytes for r in runs) > min(r.wire_bytes for r in runs)
    clean = NetModel(rng=random.Random(3)).exchange(1000)
    assert clean.response_ok and 0.2 <= clean.duration_s < 0.3
    assert clean.wire_bytes == 1000 + 40 + 120 + 40


def test_outage_windows() -> None:
    m = NetModel(outages=[(10.0, 20.0)])
    assert not m.down(9.9) and m.down(10) and m.down(19.9) and not m.down(20)


def _payload(seq: int) -> bytes:
    return encode_batch(Batch("dev-1", f"b{seq}", [chunk(seq)], 0))


async def test_simulated_uplink_outcomes() -> None:
    clock = VirtualClock()
    cloud = SimCloud()
    up = SimulatedUplink(NetModel(outages=[(0.0, 5.0)], rng=random.Random(1)), cloud, clock)
    await up.connect()
    with pytest.raises(TransportError, match="outage"):
        await _run(clock, up.send(_payload(1), batch_id="b1", timeout=1.0))
    await clock.advance(5)
    ack = await _run(clock, up.send(_payload(1), batch_id="b1", timeout=1.0))
    assert ack.status == "ok" and cloud.readings == 10
    ack = await _run(clock, up.send(_payload(1), batch_id="b1", timeout=1.0))
    assert ack.status == "duplicate" and cloud.duplicates == 1
    with pytest.raises(TransportError, match="timeout"):
        await _run(clock, up.send(_payload(11), batch_id="b2", timeout=0.05))
    assert cloud.readings == 20  # arrived after we gave up: stored all the same
    await up.close()
    assert up.attempts == 4 and up.wire_bytes > 0


async def test_lossy_ack_and_quota_throttling() -> None:
    clock = VirtualClock()
    lossy = SimulatedUplink(NetModel(loss=0.5, rng=random.Random(4)), SimCloud(), clock)
    errors = 0
    for s in range(40):
        try:
            await _run(clock, lossy.send(_payload(1 + 10 * s), batch_id="x", timeout=1.0))
        except TransportError:
            errors += 1
    assert 20 < errors < 40
    cloud = SimCloud(quota_per_s=1.0, burst=2)
    fast = SimulatedUplink(NetModel(rng=random.Random(5)), cloud, clock)
    await _run(clock, fast.send(_payload(1), batch_id="a", timeout=1.0))
    await _run(clock, fast.send(_payload(11), batch_id="b", timeout=1.0))
    with pytest.raises(ThrottledError) as ei:
        await _run(clock, fast.send(_payload(21), batch_id="c", timeout=1.0))
    assert ei.value.retry_after_s >= 1 and cloud.throttled == 1


async def _run(clock: VirtualClock, coro: Awaitable[Ack]) -> Ack:
    task = asyncio.ensure_future(coro)
    while not task.done():
        await advance_settled(clock, 0.05)
    return task.result()


def test_bench_retry_short_run(capsys: pytest.CaptureFixture[str]) -> None:
    import structlog

    try:
        rc = bench_retry.main(["--hours", "1", "--tail-hours", "1", "--seeds", "1",
                               "--cpu-seconds", "0", "--only", "loss_10pct,outage_6h"])
    finally:
        structlog.reset_defaults()
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    rows = out["results"]["scenarios"]
    assert set(rows) == {"loss_10pct", "loss_10pct_battery_profile", "outage_6h",
                         "outage_6h_loss_5pct"}
    for row in rows.values():
        for r in row.values():
            assert r["delivered_eventually"] == 1.0
            assert 0 < r["delivered_within_3_attempts"] <= 1
    assert "naive" in rows["loss_10pct"] and "naive" not in rows["loss_10pct_battery_profile"]
