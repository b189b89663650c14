"""Retry controller parts on their own: backoff, breaker, quality/AIMD, windows, power, config."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from agent.retry import (
    Aimd,
    BreakerState,
    CircuitBreaker,
    DecorrelatedJitterBackoff,
    FullJitterBackoff,
    NetworkQuality,
    PowerState,
    RetryConfig,
    agent_rng,
    make_backoff,
    parse_power_text,
    parse_windows,
)
from pymigrate.configload import convert
from pymigrate.errors import ConfigError
from pymigrate.types import Priority

DAY = 86_400_000
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


# ---------------------------------------------------------------- backoff
def test_full_jitter_bounds_grow_to_cap_and_reset() -> None:
    b = FullJitterBackoff(0.5, 8.0, random.Random(1))
    for n in range(10):
        d = b.next_delay()
        assert 0 <= d <= min(8.0, 0.5 * 2**n)
    assert b.failures == 10
    big = [b.next_delay() for _ in range(200)]
    assert max(big) <= 8.0 and max(big) > 6.0  # reaches the cap region, never past it
    b.reset()
    assert b.failures == 0 and b.next_delay() <= 0.5


def test_decorrelated_jitter_bounds_and_reset() -> None:
    b = DecorrelatedJitterBackoff(1.0, 30.0, random.Random(2))
    delays = [b.next_delay() for _ in range(50)]
    assert all(1.0 <= d <= 30.0 for d in delays)
    assert max(delays) > 15
    b.reset()
    assert b.failures == 0 and b.next_delay() <= 3.0


def test_make_backoff_by_name() -> None:
    rng = random.Random(0)
    assert isinstance(make_backoff("full_jitter", 1, 2, rng), FullJitterBackoff)
    assert isinstance(make_backoff("decorrelated", 1, 2, rng), DecorrelatedJitterBackoff)
    with pytest.raises(ValueError, match="unknown backoff"):
        make_backoff("linear", 1, 2, rng)


def test_fleet_is_not_synchronised() -> None:
    # 50 agents started together (same device image, same instant): different first delays
    firsts = {round(FullJitterBackoff(1, 60, agent_rng("dev")).next_delay(), 9)
              for _ in range(50)}
    assert len(firsts) == 50
    # a seed makes it reproducible (tests, simulations), and differs per device
    a, b = agent_rng("d1", 5).random(), agent_rng("d1", 5).random()
    assert a == b != agent_rng("d2", 5).random()


# ---------------------------------------------------------------- breaker
def _breaker(**kw: object) -> tuple[CircuitBreaker, list[tuple[str, str]]]:
    changes: list[tuple[str, str]] = []
    args: dict[str, object] = dict(failures=3, failure_rate=0.5, window=10, min_calls=6,
                                   open_base_s=10.0, open_cap_s=100.0, rng=random.Random(3),
                                   on_change=lambda n, o, s: changes.append((o.value, s.value)))
    args.update(kw)
    return CircuitBreaker("mqtt", **args), changes  # type: ignore[arg-type]


def test_breaker_opens_on_consecutive_failures_then_half_open_probe_closes() -> None:
    br, changes = _breaker()
    for _ in range(2):
        br.record_failure(0.0)
    assert br.state(0.0) is BreakerState.CLOSED and br.allow(0.0) == "send"
    br.record_failure(0.0)
    assert br.state(0.0) is BreakerState.OPEN and br.allow(1.0) is None
    assert 5.0 <= br.open_until <= 10.0
    t = br.open_until
    assert br.allow(t) == "probe" and br.state(t) is BreakerState.HALF_OPEN
    br.begin_probe()
    assert br.probe_in_flight and br.allow(t) is None  # exactly one probe
    br.record_success(probe=True)
    assert br.state(t) is BreakerState.CLOSED
    assert changes == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
    assert br.transitions["closed->open"] == 1


def test_breaker_failed_probe_reopens_with_longer_backoff() -> None:
    br, _ = _breaker()
    for _ in range(3):
        br.record_failure(0.0)
    t = br.open_until
    br.state(t)
    br.begin_probe()
    br.record_failure(t, probe=True)
    assert br.state(t) is BreakerState.OPEN
    assert 10.0 <= br.open_until - t <= 20.0  # second opening: ceiling doubled
    # a late failure of an old batch while open changes nothing
    br.record_failure(t + 1)
    assert br.state(t + 1) is BreakerState.OPEN


def test_breaker_opens_on_failure_rate_over_window() -> None:
    br, _ = _breaker(failures=100)
    for i in range(5):
        br.record_failure(0.0) if i % 2 == 0 else br.record_success()
    assert br.state(0.0) is BreakerState.CLOSED  # 5 calls < min_calls
    br.record_failure(0.0)  # 6 calls, 4 failures >= 50 %
    assert br.state(0.0) is BreakerState.OPEN


def test_throttling_never_trips_and_proves_the_link() -> None:
    br, _ = _breaker()
    for _ in range(50):
        br.record_neutral()
    assert br.state(0.0) is BreakerState.CLOSED
    for _ in range(3):
        br.record_failure(0.0)
    t = br.open_until
    br.state(t)
    br.begin_probe()
    br.record_neutral(probe=True)  # throttled probe: link alive -> closed
    assert br.state(t) is BreakerState.CLOSED
    for _ in range(3):
        br.record_failure(t)
    t2 = br.open_until
    br.state(t2)
    br.begin_probe()
    br.record_aborted(probe=True)  # shutdown: nothing learnt, probe slot free again
    assert br.allow(t2) == "probe"
    br.record_success()  # any success closes a half-open breaker
    assert br.state(t2) is BreakerState.CLOSED


# ---------------------------------------------------------------- quality + AIMD
def test_rtt_ewma_deviation_and_blowup_detection() -> None:
    q = NetworkQuality()
    for _ in range(20):
        assert q.record_success(0.2, 1000)
    assert q.srtt == pytest.approx(0.2) and q.rttvar < 0.01
    assert q.throughput_bps == pytest.approx(5000)
    assert not q.rtt_normal(1.0)
    assert q.rtt_normal(0.2)
    q.record_failure(1000)
    assert q.success_rate == pytest.approx(0.9)


def test_timeout_initial_then_rto_plus_transfer_clamped() -> None:
    c = RetryConfig(timeout_min_s=0.5, timeout_initial_s=3.0, timeout_max_s=5.0)
    q = NetworkQuality()
    assert q.timeout(100, c) == 3.0
    for _ in range(10):
        q.record_success(0.2, 2000)  # 10 kB/s
    t_small = q.timeout(100, c)
    assert 0.5 <= t_small < 1.0
    assert q.srtt is not None
    rto = q.srtt + 4 * max(q.rttvar, 0.01)
    assert q.timeout(20_000, c) == pytest.approx(rto + 2.0)  # + transfer time at 10 kB/s
    assert q.timeout(10**9, c) == 5.0


def test_aimd_additive_increase_multiplicative_decrease_bounded() -> None:
    c = RetryConfig(batch_min_bytes=1000, batch_initial_bytes=4000, batch_max_bytes=10_000,
                    batch_increase_bytes=1000, inflight_max=3)
    a = Aimd(c)
    a.on_success(True)
    assert a.batch_limit == 5000
    for _ in range(50):
        a.on_success(True)
    assert a.batch_limit == 10_000 and a.inflight_limit == 3
    a.decrease()
    assert a.batch_limit == 5000 and a.inflight_limit == 1
    a.on_success(False)  # RTT blow-up counts as congestion
    assert a.batch_limit == 2500
    for _ in range(10):
        a.decrease()
    assert a.batch_limit == 1000 and a.inflight_limit == 1


def test_loss_aware_cap_shrinks_batches_on_lossy_links() -> None:
    c = RetryConfig(batch_min_bytes=500, batch_initial_bytes=60_000, target_attempt_success=0.9)
    a = Aimd(c)
    q = NetworkQuality()
    assert q.loss_cap_bytes(0.9) is None  # no evidence of loss
    assert a.effective_batch(q, 100) == 60_000
    for i in range(40):  # 8 kB attempts succeeding half the time
        q.record_success(0.1, 8000) if i % 2 else q.record_failure(8000)
    cap = q.loss_cap_bytes(0.9)
    assert cap is not None and 500 < cap < 8000
    assert a.effective_batch(q, 100) == int(cap - 100)
    assert q.loss_cap_bytes(0.0) is None


# ---------------------------------------------------------------- windows
def test_daily_slot_open_close_next() -> None:
    w = parse_windows(("02:00-02:30",), 300)
    assert not w.is_open(T0)
    assert w.next_open_ms(T0) == T0 + 2 * 3600_000
    assert w.is_open(T0 + 2 * 3600_000 + 1)
    assert w.close_ms(T0 + 2 * 3600_000) == T0 + 2 * 3600_000 + 30 * 60_000
    assert w.next_open_ms(T0 + 3 * 3600_000) == T0 + DAY + 2 * 3600_000
    assert w.close_ms(T0) is None


def test_slot_wrapping_midnight_and_cron_minutes() -> None:
    w = parse_windows(("23:50-00:10",), 300)
    assert w.is_open(T0 + 5 * 60_000) and w.is_open(T0 - 5 * 60_000)
    assert not w.is_open(T0 + 11 * 60_000)
    c = parse_windows(("*/15 * * * *",), 120)
    assert c.is_open(T0 + 60_000) and not c.is_open(T0 + 3 * 60_000)
    assert c.next_open_ms(T0 + 3 * 60_000) == T0 + 15 * 60_000
    h = parse_windows(("5 3,4 * * *", "0 10-11/1 * * *"), 60)
    assert h.next_open_ms(T0) == T0 + (3 * 60 + 5) * 60_000
    assert h.next_open_ms(T0 + 5 * 3600_000) == T0 + 10 * 3600_000
    assert parse_windows((), 60).is_open(T0) and parse_windows((), 60).close_ms(T0) is None


@pytest.mark.parametrize("spec", ["25:00-26:00", "02:00-02:00", "* * 1 * *", "x", "*/0 * * * *",
                                  "70 * * * *", "02:00"])
def test_bad_window_names_its_key(spec: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_windows(("01:00-02:00", spec), 60)
    assert ei.value.key == "retry.windows[1]"


# ---------------------------------------------------------------- power
async def test_power_state_low_battery_and_wake(tmp_path: Path) -> None:
    p = PowerState("battery", 50, low_battery_pct=20)
    assert p.min_priority is Priority.LOW and not p.low_battery
    waiter = asyncio.create_task(p.wait_changed())
    await asyncio.sleep(0)
    p.update(battery_pct=10)
    await asyncio.wait_for(waiter, 1)
    assert p.low_battery and p.min_priority is Priority.CRITICAL
    with pytest.raises(ValueError):
        p.update(profile="solar")
    with pytest.raises(ValueError):
        PowerState("solar")


def test_power_file_json_and_text(tmp_path: Path) -> None:
    f = tmp_path / "power"
    p = PowerState(path=f)
    assert not p.refresh()  # no file yet
    f.write_text('{"profile": "metered", "battery_pct": 15}')
    assert p.refresh() and p.profile == "metered" and p.low_battery
    assert not p.refresh()  # unchanged mtime: not re-read
    f.write_text("battery 80")
    import os
    os.utime(f, ns=(1, 10**18))
    assert p.refresh() and p.profile == "battery" and p.battery_pct == 80
    f.write_text("garbage")
    os.utime(f, ns=(1, 2 * 10**18))
    assert not p.refresh() and p.errors == 1 and p.profile == "battery"
    assert PowerState().refresh() is False
    assert parse_power_text("unmetered") == ("unmetered", None)
    for bad in ("", "[1]"):
        with pytest.raises(ValueError):
            parse_power_text(bad)


# ---------------------------------------------------------------- config
def test_config_defaults_and_from_dict() -> None:
    c = RetryConfig.from_dict({"backoff": "decorrelated", "windows": ["02:00-02:30"]})
    assert c.backoff == "decorrelated" and c.windows == ("02:00-02:30",)
    assert RetryConfig().profile == "unmetered"


@pytest.mark.parametrize(("data", "key"), [
    ({"bogus": 1}, "retry.bogus"),
    ({"backoff": "linear"}, "retry.backoff"),
    ({"profile": "solar"}, "retry.profile"),
    ({"backoff_base_s": 0}, "retry.backoff_base_s"),
    ({"backoff_cap_s": 0.1}, "retry.backoff_cap_s"),
    ({"breaker_open_cap_s": 1}, "retry.breaker_open_cap_s"),
    ({"breaker_failure_rate": 1.5}, "retry.breaker_failure_rate"),
    ({"breaker_min_calls": 50}, "retry.breaker_min_calls"),
    ({"rtt_alpha": 1}, "retry.rtt_alpha"),
    ({"target_attempt_success": 1}, "retry.target_attempt_success"),
    ({"rtt_k": 0}, "retry.rtt_k"),
    ({"timeout_initial_s": 100}, "retry.timeout_initial_s"),
    ({"batch_initial_bytes": 10}, "retry.batch_initial_bytes"),
    ({"inflight_initial": 9}, "retry.inflight_initial"),
    ({"low_battery_pct": 120}, "retry.low_battery_pct"),
    ({"max_attempts": -1}, "retry.max_attempts"),
    ({"max_chunks": 0}, "retry.max_chunks"),
    ({"windows": ["nope"]}, "retry.windows[0]"),
    ({"breaker_failures": "x"}, "retry.breaker_failures"),
])
def test_config_errors_name_the_key(data: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as ei:
        convert(data, RetryConfig, section="retry")
    assert ei.value.key == key


def test_timeout_doubles_per_consecutive_timeout_until_success() -> None:
    c = RetryConfig(timeout_min_s=1.0, timeout_initial_s=2.0, timeout_max_s=10.0)
    q = NetworkQuality()
    assert q.timeout(100, c) == 2.0
    q.record_failure(100, timed_out=True)
    assert q.timeout(100, c) == 4.0
    q.record_failure(100)  # a fast failure (refused) does not stretch the timeout
    assert q.timeout(100, c) == 4.0
    for _ in range(5):
        q.record_failure(100, timed_out=True)
    assert q.timeout(100, c) == 10.0
    q.record_success(0.1, 100)
    assert q.timeout(100, c) == 1.0
