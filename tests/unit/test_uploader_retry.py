"""Uploader under failure: retry order, breaker, throttling, AIMD, failover, windows, power."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from agent.retry import PowerState, RetryConfig
from pymigrate.clock import VirtualClock
from pymigrate.types import Priority
from tests.unit.uploader_helpers import advance, cfg, chunk, make, running


async def test_failed_batch_goes_back_to_head_and_order_is_kept() -> None:
    clock, buf, (ul,), up = make(5, config=cfg(batch_initial_bytes=1024, batch_min_bytes=1024))
    ul.script("fail", "timeout")
    async with running(up):
        await advance(clock, 60)
    assert len(buf) == 0
    assert ul.seqs == sorted(ul.seqs)  # retried batch resent before anything newer
    assert ul.sent[0].chunks[0].seq_first == ul.sent[1].chunks[0].seq_first == 1
    st = up.stats()
    assert st["batches_failed"] == 2
    assert st["attempts"][3] == 1  # the first batch made it on its third attempt
    assert st["readings_by_attempt"][3] == sum(c.count for c in ul.sent[2].chunks)
    assert "-a3-" in ul.sent[2].batch_id


async def test_retry_waits_a_jittered_backoff_not_a_tight_loop() -> None:
    c = cfg(backoff_base_s=2.0, backoff_cap_s=2.0, breaker_failures=10, breaker_min_calls=20,
            breaker_window=20)
    clock, _buf, (ul,), up = make(1, config=c)
    ul.default = "fail"
    async with running(up):
        await advance(clock, 60)
    times = [b.sent_ms for b in ul.sent][:10]
    gaps = [(b - a) / 1000 for a, b in itertools.pairwise(times)]
    # full jitter on [0, 2 s] after each 0.1 s failed attempt; the breaker opens after 10
    assert len(gaps) == 9 and all(0.1 <= g <= 2.1 for g in gaps)
    assert len(set(gaps)) == 9  # jittered, not fixed
    # then the breaker is open: probes only, spaced by its own growing backoff
    assert up.stats()["uplinks"]["up0"]["transitions"]["closed->open"] == 1
    later = [b.sent_ms for b in ul.sent][9:]
    assert 2 <= len(later) <= 6
    assert all(b - a >= 2400 for a, b in itertools.pairwise(later))
    assert up.stats()["wakeups"] <= 2 * len(ul.sent) + 2


async def test_breaker_opens_stops_sending_and_probes_with_one_small_batch() -> None:
    events: list[tuple[str, dict[str, object]]] = []
    c = cfg(breaker_failures=3, breaker_open_base_s=100, breaker_open_cap_s=100,
            probe_max_bytes=300)
    clock, buf, (ul,), up = make(10, config=c, on_event=lambda n, f: events.append((n, f)))
    ul.default = "fail"
    async with running(up):
        await advance(clock, 30)
        assert len(ul.sent) == 3
        assert up.stats()["uplinks"]["up0"]["breaker"] == "open"
        await advance(clock, 30)
        assert len(ul.sent) == 3  # open: silence (and no busy loop: few wake-ups)
        wk = up.stats()["wakeups"]
        ul.default = "ok"
        await advance(clock, 60)  # open lasts 50..100 s: the probe went out
        probe = ul.sent[3]
        assert len(probe.chunks) == 1
        await advance(clock, 30)
        assert up.stats()["wakeups"] - wk < 60
    assert len(buf) == 0
    st = up.stats()["uplinks"]["up0"]
    assert st["breaker"] == "closed"
    assert st["transitions"] == {"closed->open": 1, "open->half_open": 1, "half_open->closed": 1}
    assert [f["new"] for n, f in events if n == "breaker"] == ["open", "half_open", "closed"]
    assert up.stats()["attempts"].get(4, 0) >= 1  # the first chunk: 3 failures then the probe


async def test_throttling_is_obeyed_and_never_trips_the_breaker() -> None:
    events: list[str] = []
    clock, buf, (ul,), up = make(3, config=cfg(breaker_failures=2, throttle_jitter=0.1),
                                 on_event=lambda n, f: events.append(n))
    ul.script(*["throttle:30", "throttle_ack:30"] * 3)
    async with running(up):
        await advance(clock, 1)
        assert len(ul.sent) == 1
        await advance(clock, 29)
        assert len(ul.sent) == 1  # retry-after respected
        await advance(clock, 900)
    assert len(buf) == 0
    st = up.stats()
    assert st["batches_throttled"] == 6
    assert st["uplinks"]["up0"]["breaker"] == "closed"
    assert st["uplinks"]["up0"]["transitions"] == {}
    assert events.count("throttled") == 6
    gaps = [b.sent_ms - a.sent_ms for a, b in itertools.pairwise(ul.sent)][:6]
    assert all(g >= 30_000 for g in gaps)  # never before retry-after
    # and the spacing is learnt: each throttle widens it (x1.25), so the quota is hit less
    assert all(b > a for a, b in itertools.pairwise(gaps)) and gaps[-1] < 30_000 * 1.25**5 * 1.2


async def test_aimd_grows_batches_on_a_good_link_and_shrinks_on_timeouts() -> None:
    c = cfg(batch_min_bytes=1024, batch_initial_bytes=2048, batch_max_bytes=64 * 1024,
            batch_increase_bytes=1024, inflight_max=4)
    clock, buf, (ul,), up = make(300, config=c)
    async with running(up):
        await advance(clock, 3)
        assert len(ul.sent) >= 2
        await advance(clock, 100)
        assert len(buf) == 0
        assert up.aimd.batch_limit > 2048 * 4 and up.aimd.inflight_limit > 1
        sizes = [len(b.chunks) for b in ul.delivered]
        assert max(sizes) > 2 * sizes[0]
        for s in range(300, 330):
            buf.put_nowait(chunk(1 + 10 * s))
        before = up.aimd.batch_limit
        ul.script("timeout", "timeout")
        await advance(clock, 100)
        assert up.aimd.decreases >= 2 and up.aimd.batch_limit < before
        assert len(buf) == 0


async def test_several_batches_in_flight_when_allowed() -> None:
    c = cfg(batch_min_bytes=1024, batch_initial_bytes=1024, inflight_initial=3, inflight_max=3)
    clock, buf, (ul,), up = make(30, config=c)
    ul.delay_s = 1.0
    async with running(up):
        await advance(clock, 0.5)
        assert up.stats()["inflight"] == 3
        await advance(clock, 30)
    assert len(buf) == 0


async def test_failover_to_next_uplink_while_primary_breaker_open_then_back() -> None:
    c = cfg(breaker_failures=2, breaker_open_base_s=60, breaker_open_cap_s=60,
            batch_initial_bytes=1024, batch_min_bytes=1024)
    clock, buf, (mqtt, coap), up = make(6, uplinks=2, config=c)
    mqtt.default = "fail"
    async with running(up):
        await advance(clock, 20)
        assert len(buf) == 0
        assert coap.delivered and not mqtt.delivered
        assert up.stats()["uplinks"]["up0"]["breaker"] == "open"
        mqtt.default = "ok"
        await advance(clock, 60)  # primary's open period ends
        for s in range(6, 12):
            buf.put_nowait(chunk(1 + 10 * s))
        await advance(clock, 30)  # one probe on the primary (the rest via the secondary)
        assert len(mqtt.delivered[0].chunks) == 1  # the probe: one small batch
        assert up.stats()["uplinks"]["up0"]["breaker"] == "closed"
        for s in range(12, 15):
            buf.put_nowait(chunk(1 + 10 * s))
        await advance(clock, 30)  # traffic is back on the primary
    assert len(buf) == 0
    assert mqtt.seqs[-3:] == [121, 131, 141]
    delivered = sorted(mqtt.seqs + coap.seqs)
    assert delivered == [1 + 10 * s for s in range(15)]


async def test_reconnects_after_repeated_failures_and_survives_os_errors() -> None:
    clock, buf, (ul,), up = make(2, config=cfg(reconnect_after_failures=2))
    ul.connect_fails = 1
    ul.script("oserror", "fail", "weird")
    async with running(up):
        await advance(clock, 120)
    assert len(buf) == 0
    assert ul.connects >= 3 and ul.closes >= 1
    assert up.stats()["batches_failed"] >= 4


async def test_waits_for_the_connectivity_window() -> None:
    # the virtual clock starts at 2026-01-01T00:00Z; the slot opens at 02:00
    clock, buf, (ul,), up = make(3, config=cfg(windows=("02:00-02:30",)))
    async with running(up):
        await advance(clock, 2 * 3600 - 1)
        assert ul.sent == []
        assert up.stats()["wakeups"] <= 2  # slept until the window, no polling
        await advance(clock, 5)
        assert len(buf) == 0
        first = ul.sent[0].sent_ms
        assert first >= clock.true_time_ms() - 6000 and (first // 1000) % 86400 >= 7200
        await advance(clock, 1800)
        buf.put_nowait(chunk(999))
        await advance(clock, 3600)  # window closed again: waits for tomorrow
        assert len(buf) == 1
        await advance(clock, 86400)
        assert len(buf) == 0


async def test_low_battery_sends_critical_only_until_power_recovers() -> None:
    power = PowerState("battery", 10, low_battery_pct=20)
    clock, buf, (ul,), up = make(config=cfg(linger_battery_s=600), power=power)
    buf.put_nowait(chunk(1, priority=Priority.LOW))
    buf.put_nowait(chunk(11, priority=Priority.NORMAL))
    async with running(up):
        await advance(clock, 3600)
        assert ul.sent == []
        buf.put_nowait(chunk(21, priority=Priority.CRITICAL))
        await advance(clock, 1)
        assert ul.seqs == [21]  # critical goes at once, even on battery, alone
        await advance(clock, 3600)
        assert len(buf) == 2
        power.update(battery_pct=90)  # charged: the sleeping uploader wakes on the change
        await advance(clock, 599)
        assert len(buf) == 2  # battery profile: linger to send one larger batch
        await advance(clock, 2)
    assert len(buf) == 0
    assert len(ul.sent) == 2 and len(ul.sent[1].chunks) == 2


async def test_metered_profile_lingers_for_fewer_larger_batches(tmp_path: object) -> None:
    clock, buf, (ul,), up = make(config=cfg(profile="metered", linger_metered_s=300))
    async with running(up):
        for s in range(10):
            buf.put_nowait(chunk(1 + 10 * s))
            await advance(clock, 20)
        assert ul.sent == []
        await advance(clock, 200)
        assert len(ul.sent) == 1 and len(ul.sent[0].chunks) == 10
        up.power.update(profile="unmetered")
        buf.put_nowait(chunk(500))
        await advance(clock, 1)
        assert len(ul.sent) == 2


async def test_power_file_is_read_at_run_time(tmp_path: object) -> None:
    from pathlib import Path

    f = Path(str(tmp_path)) / "power.json"
    f.write_text('{"profile": "unmetered", "battery_pct": 5}')
    clock, buf, (ul,), up = make(config=cfg(power_file=str(f), power_check_s=60))
    buf.put_nowait(chunk(1, priority=Priority.LOW))
    async with running(up):
        await advance(clock, 30)
        assert ul.sent == [] and up.power.low_battery
        f.write_text('{"battery_pct": 60}')
        import os
        os.utime(f, ns=(1, 10**18))
        await advance(clock, 61)
        assert len(buf) == 0


async def test_failed_chunks_are_retried_in_minimal_batches() -> None:
    c = cfg(batch_min_bytes=1024, batch_initial_bytes=64 * 1024)
    clock, buf, (ul,), up = make(config=c)
    for s in range(8):
        buf.put_nowait(chunk(1 + 10 * s, nbytes=600))
    ul.script("fail")
    async with running(up):
        await advance(clock, 30)
    assert len(buf) == 0
    assert len(ul.sent[0].chunks) == 8  # one big batch first
    assert [len(b.chunks) for b in ul.sent[1:9]] == [1] * 8  # each failed chunk alone
    assert up.stats()["attempts"] == {2: 8}  # spilled chunks kept their own count
    assert ul.seqs == [1 + 10 * s for s in range(8)]


async def test_attempt_timeout_adapts_to_rtt_and_backs_off_after_timeouts() -> None:
    clock, buf, (ul,), up = make(config=cfg(batch_min_bytes=1024, batch_initial_bytes=1024,
                                            timeout_min_s=0.5))
    for s in range(4):
        buf.put_nowait(chunk(1 + 10 * s, nbytes=900))  # one chunk per batch
    ul.delay_s = 0.2
    async with running(up):
        await advance(clock, 5)
        ul.script("timeout", "timeout")
        for s in range(4, 6):
            buf.put_nowait(chunk(1 + 10 * s, nbytes=900))
        await advance(clock, 30)
    assert len(buf) == 0
    t = ul.timeouts
    assert t[0] == up.cfg.timeout_initial_s  # no RTT sample yet
    assert 0.5 <= t[1] < 2.0 and 0.5 <= t[2] < 2.0  # learnt from 0.2 s RTTs
    # attempts 3 and 4 follow timeouts: each doubles (Karn); the success resets it
    assert ul.sent[3].chunks[0].seq_first == ul.sent[4].chunks[0].seq_first
    assert t[4] == pytest.approx(2 * t[3])
    assert t[5] < t[4] / 2


async def test_throttled_chunks_keep_their_batch_size_and_pacing_decays() -> None:
    clock, buf, (ul,), up = make(config=cfg(batch_initial_bytes=64 * 1024))
    for s in range(8):
        buf.put_nowait(chunk(1 + 10 * s, nbytes=600))
    ul.script("throttle:5")
    async with running(up):
        await advance(clock, 30)
        assert [len(b.chunks) for b in ul.sent] == [8, 8]  # not a link failure: same batch
        pace = up._slots[0].pace_s
        assert pace == pytest.approx(5.0 * 0.98)  # learnt from retry-after, one ack since
        for s in range(8, 40):
            buf.put_nowait(chunk(1 + 10 * s, nbytes=600))
            await advance(clock, 10)
        assert up._slots[0].pace_s < pace  # unthrottled acks relax the learnt spacing
    assert len(buf) == 0


async def test_two_agents_started_together_do_not_retry_together() -> None:
    from agent.uploader import Uploader
    from tests.unit.fakes_buffer import FakeBuffer
    from tests.unit.fakes_uplink import FakeUplink

    clock = VirtualClock()
    uls, ups = [], []
    for _ in range(2):  # same device image, same config, no seed: os.urandom decides
        buf = FakeBuffer(clock)
        buf.put_nowait(chunk(1))
        ul = FakeUplink(clock, default="fail")
        uls.append(ul)
        ups.append(Uploader(buf, [ul], device_id="dev-1", clock=clock,
                            config=RetryConfig(backoff_base_s=10, backoff_cap_s=60)))
    tasks = [asyncio.create_task(u.run()) for u in ups]
    await advance(clock, 120)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    a, b = ([x.sent_ms for x in ul.sent] for ul in uls)
    assert a[0] == b[0]  # the first attempts coincide (started together)
    assert a[1:4] != b[1:4]  # the retries do not
