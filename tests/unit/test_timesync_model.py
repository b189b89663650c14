"""Time correction: offset/drift estimation, min-delay filter, RTC resets and jumps."""

from __future__ import annotations

import random

import pytest

from agent.timesync import TimeCorrector, TimeSyncConfig
from pymigrate.clock import VirtualClock
from pymigrate.configload import convert
from pymigrate.errors import ConfigError
from pymigrate.types import Quality, Reading

EPOCH_1970 = 5_000  # an RTC that lost power restarts near the epoch


class DeviceClock:
    """A device's clocks over a VirtualClock (true time): the RTC and the monotonic
    clock both run ``1 + drift`` fast (one crystal); the RTC can step or reset."""

    def __init__(self, true: VirtualClock, offset_ms: float = 0.0, drift_ppm: float = 0.0):
        self.true = true
        self.k = 1.0 + drift_ppm * 1e-6
        self.m0 = true.monotonic()
        self.rtc_base = true.true_time_ms() + offset_ms

    def monotonic(self) -> float:
        return (self.true.monotonic() - self.m0) * self.k

    def time_ms(self) -> int:
        return int(self.rtc_base + self.monotonic() * 1000.0)

    def step(self, ms: float) -> None:
        self.rtc_base += ms

    def reset_to(self, wall_ms: int) -> None:
        self.rtc_base = wall_ms - self.monotonic() * 1000.0

    async def sleep(self, seconds: float) -> None:  # pragma: no cover - Clock protocol only
        await self.true.sleep(seconds / self.k)

    async def sleep_until(self, deadline: float) -> None:  # pragma: no cover
        await self.true.sleep(max(0.0, deadline - self.monotonic()) / self.k)


def setup(offset_ms: float = 0.0, drift_ppm: float = 0.0, **cfg: object
          ) -> tuple[VirtualClock, DeviceClock, TimeCorrector]:
    true = VirtualClock()
    dev = DeviceClock(true, offset_ms, drift_ppm)
    return true, dev, TimeCorrector(TimeSyncConfig(**cfg), clock=dev)  # type: ignore[arg-type]


async def exchange(true: VirtualClock, dev: DeviceClock, tc: TimeCorrector,
                   up_ms: float, down_ms: float, proc_ms: float = 2.0) -> bool:
    """One upload + ack: server times are true time."""
    t1 = dev.time_ms()
    await true.advance(up_ms / 1000)
    t2 = true.true_time_ms()
    await true.advance(proc_ms / 1000)
    t3 = true.true_time_ms()
    await true.advance(down_ms / 1000)
    return tc.add_sample(t1, t2, t3, dev.time_ms())


def reading_now(dev: DeviceClock, sensor: str = "t", **kw: object) -> Reading:
    return Reading("dev1", sensor, dev.time_ms(), 1.0, **kw)  # type: ignore[arg-type]


async def sync(true: VirtualClock, dev: DeviceClock, tc: TimeCorrector, n: int,
               interval_s: float, rng: random.Random) -> None:
    for _ in range(n):
        # asymmetric noise: each direction has its own random queueing delay
        await exchange(true, dev, tc, 15 + rng.expovariate(1 / 60), 15 + rng.expovariate(1 / 25))
        await true.advance(interval_s)


@pytest.mark.parametrize("drift_ppm", [200.0, -200.0, 73.0, 0.0])
async def test_drift_and_offset_estimated(drift_ppm: float) -> None:
    true, dev, tc = setup(offset_ms=-540_000, drift_ppm=drift_ppm)
    rng = random.Random(int(drift_ppm) + 11)
    await sync(true, dev, tc, 60, 120.0, rng)  # two hours of acks every two minutes
    drift = tc.drift_ppm()
    assert drift is not None
    assert abs(drift - drift_ppm) < 5.0
    off = tc.offset_ms()
    assert off is not None
    assert abs(off - (true.true_time_ms() - dev.time_ms())) < 25
    errors = []
    for _ in range(20):
        await true.advance(7.3)
        r = tc.correct([reading_now(dev)])[0]
        err = abs(r.ts_ms - true.true_time_ms())
        errors.append(err)
        assert r.quality == Quality.TIME_CORRECTED
        assert r.raw_ts_ms is not None and abs(r.raw_ts_ms - r.ts_ms) > 500_000
        assert err <= r.uncert_ms
    assert max(errors) < 30
    st = tc.status()
    assert st["state"] == "synced" and st["samples"] == 60


async def test_drift_unknown_before_min_span_then_known() -> None:
    true, dev, tc = setup(offset_ms=1000, drift_ppm=150, min_drift_span_s=600)
    rng = random.Random(2)
    assert tc.drift_ppm() is None and tc.offset_ms() is None
    await sync(true, dev, tc, 3, 60.0, rng)
    assert tc.synced() and tc.drift_ppm() is None
    await sync(true, dev, tc, 12, 60.0, rng)
    d = tc.drift_ppm()
    assert d is not None and abs(d - 150) < 30


async def test_wants_samples_until_drift_known_then_uncertainty_covers_error() -> None:
    true, dev, tc = setup(offset_ms=-200_000, drift_ppm=-190, drift_target_ppm=50)
    rng = random.Random(21)
    assert tc.wants_samples()
    pings = 0
    while tc.wants_samples():  # warm-up: a ping a minute
        await sync(true, dev, tc, 1, 60.0, rng)
        pings += 1
        assert pings < 60
    assert pings >= 4  # one or two acks cannot pin down the drift
    d = tc.drift_ppm()
    assert d is not None and abs(d + 190) < 50
    covered = 0
    for _ in range(60):  # then acks only every 5 minutes
        await sync(true, dev, tc, 1, 300.0, rng)
        await true.advance(rng.uniform(0, 290))
        r = tc.correct([reading_now(dev)])[0]
        covered += abs(r.ts_ms - true.true_time_ms()) <= r.uncert_ms
    assert covered >= 57


async def test_min_delay_filter_rejects_delayed_samples() -> None:
    true, dev, tc = setup(offset_ms=30_000)
    rng = random.Random(5)
    for i in range(40):
        if i % 2:
            # a queued uplink: 1.5 s one way, 20 ms back -> offset error ~ 740 ms
            await exchange(true, dev, tc, 1500 + rng.random() * 500, 20)
        else:
            await exchange(true, dev, tc, 20 + rng.random() * 10, 20 + rng.random() * 10)
        await true.advance(30.0)
    off = tc.offset_ms()
    assert off is not None
    assert abs(off - 30_000 * -1) < 15  # delayed half ignored (a plain mean is ~370 ms off)
    # a sample with a delay beyond max_delay_ms never enters the window
    assert not await exchange(true, dev, tc, 9_000, 2_000)
    assert tc.status()["samples_rejected_delay"] == 1
    # impossible sample (server says it held the message longer than the round trip)
    t1 = dev.time_ms()
    assert not tc.add_sample(t1, true.true_time_ms(), true.true_time_ms() + 5_000, t1 + 10)
    assert tc.status()["samples_rejected_delay"] == 2


async def test_window_and_sample_count_bounded() -> None:
    true, dev, tc = setup(max_samples=16, window_s=600.0)
    rng = random.Random(1)
    await sync(true, dev, tc, 40, 60.0, rng)
    assert tc.status()["samples"] == 10  # only the last 600 s: 10 samples at 60 s
    true2, dev2, tc2 = setup(max_samples=16, window_s=1e6)
    await sync(true2, dev2, tc2, 40, 60.0, rng)
    assert tc2.status()["samples"] == 16


async def test_unsynced_keeps_raw_time_and_flags_uncertain() -> None:
    _true, dev, tc = setup(offset_ms=5_000)
    r = reading_now(dev, quality=int(Quality.SENSOR_FAULT | Quality.TIME_CORRECTED))
    out = tc.correct([r])[0]
    assert out.ts_ms == r.ts_ms == out.raw_ts_ms
    # stale time flags from upstream are replaced, others kept
    assert out.quality == Quality.TIME_UNCERTAIN | Quality.SENSOR_FAULT
    assert out.uncert_ms == 0
    assert tc.status()["state"] == "unsynced"
    assert tc.now_ms() == dev.time_ms()


async def test_rtc_reset_to_1970_detected_and_anchored() -> None:
    true, dev, tc = setup(offset_ms=-120_000, drift_ppm=-80)
    rng = random.Random(9)
    await sync(true, dev, tc, 30, 120.0, rng)
    before = reading_now(dev, "old")  # stamped just before the power glitch
    true_before = true.true_time_ms()
    await true.advance(1.0)
    dev.reset_to(EPOCH_1970)
    await true.advance(30.0)
    after = reading_now(dev, "new")
    out_before, out_after = tc.correct([before, after])
    st = tc.status()
    assert st["rtc_resets"] == 1 and st["jumps"] == 1
    assert st["state"] == "anchored" and st["rtc_trusted"] is False
    assert out_after.raw_ts_ms is not None and out_after.raw_ts_ms < 100_000
    assert abs(out_after.ts_ms - true.true_time_ms()) < 40
    assert out_after.quality == Quality.TIME_CORRECTED | Quality.TIME_ANCHORED
    # a reading stamped before the reset still maps through the old relation
    assert abs(out_before.ts_ms - true_before) < 40
    assert out_before.quality == Quality.TIME_CORRECTED
    # sync keeps working on the 1970 clock; readings stay anchored (RTC still bogus)
    await sync(true, dev, tc, 5, 60.0, rng)
    out = tc.correct([reading_now(dev)])[0]
    assert abs(out.ts_ms - true.true_time_ms()) < 40
    assert out.quality & Quality.TIME_ANCHORED
    assert tc.status()["samples_rejected_jump"] == 0


async def test_rtc_reset_before_any_sync_uses_last_good_wall_anchor() -> None:
    true, dev, tc = setup(offset_ms=0)
    tc.correct([reading_now(dev)])  # RTC seen as plausible: the last good anchor
    await true.advance(10.0)
    dev.reset_to(EPOCH_1970)
    await true.advance(3600.0)
    out = tc.correct([reading_now(dev)])[0]
    assert out.quality == Quality.TIME_ANCHORED | Quality.TIME_UNCERTAIN
    assert abs(out.ts_ms - true.true_time_ms()) < 10
    assert out.uncert_ms >= 2000
    assert tc.status()["state"] == "unsynced"
    assert tc.counters["anchored"] == 1


async def test_boot_in_1970_without_sync_then_sync() -> None:
    true = VirtualClock()
    dev = DeviceClock(true, offset_ms=0)
    dev.reset_to(EPOCH_1970)
    tc = TimeCorrector(TimeSyncConfig(), clock=dev)
    r = reading_now(dev)
    out = tc.correct([r])[0]
    assert out.ts_ms == r.ts_ms and out.quality == Quality.TIME_UNCERTAIN  # nothing better
    await exchange(true, dev, tc, 30, 30)
    out = tc.correct([r])[0]  # the same reading, corrected after the first ack
    assert abs(out.ts_ms - (true.true_time_ms() - 60)) < 40
    assert out.quality == Quality.TIME_CORRECTED | Quality.TIME_ANCHORED


async def test_backwards_step_detected_then_trusted_after_sync() -> None:
    true, dev, tc = setup(offset_ms=0, drift_ppm=50)
    rng = random.Random(4)
    await sync(true, dev, tc, 20, 120.0, rng)
    dev.step(-3_600_000)  # someone set the clock back an hour
    await true.advance(5.0)
    out = tc.correct([reading_now(dev)])[0]
    assert tc.status()["backward_steps"] == 1
    assert abs(out.ts_ms - true.true_time_ms()) < 40
    assert out.quality == Quality.TIME_CORRECTED | Quality.TIME_ANCHORED
    await sync(true, dev, tc, 1, 5.0, rng)  # a good sync in the new regime
    out = tc.correct([reading_now(dev)])[0]
    assert out.quality == Quality.TIME_CORRECTED
    assert abs(out.ts_ms - true.true_time_ms()) < 40
    assert tc.status()["state"] == "synced"


async def test_forward_step_over_threshold_detected_small_step_tolerated() -> None:
    true, dev, tc = setup(step_threshold_ms=2000)
    rng = random.Random(8)
    await sync(true, dev, tc, 5, 60.0, rng)
    dev.step(1500)  # below threshold: slewing-sized, followed
    tc.correct([reading_now(dev)])
    assert tc.status()["jumps"] == 0
    dev.step(600_000)
    await true.advance(1.0)
    out = tc.correct([reading_now(dev)])[0]
    st = tc.status()
    assert st["forward_steps"] == 1 and st["jumps"] == 1
    assert abs(out.ts_ms - true.true_time_ms()) < 1600  # the small step is the residue


async def test_jump_between_send_and_ack_rejects_sample() -> None:
    true, dev, tc = setup()
    tc.correct([])
    t1 = dev.time_ms()
    await true.advance(0.05)
    t2 = t3 = true.true_time_ms()
    dev.step(-7_200_000)
    await true.advance(0.05)
    assert not tc.add_sample(t1, t2, t3, dev.time_ms())
    assert tc.status()["samples_rejected_jump"] == 1
    assert not tc.synced()


async def test_future_raw_time_anchored_at_arrival() -> None:
    true, dev, tc = setup(offset_ms=0)
    rng = random.Random(3)
    await sync(true, dev, tc, 3, 60.0, rng)
    r = Reading("dev1", "x", dev.time_ms() + 86_400_000, 1.0)  # a sensor a day ahead
    out = tc.correct([r])[0]
    # arrival time, corrected: still not the measurement instant
    assert out.quality == (Quality.TIME_CORRECTED | Quality.TIME_ANCHORED
                           | Quality.TIME_UNCERTAIN)
    assert abs(out.ts_ms - true.true_time_ms()) < 40
    assert out.raw_ts_ms == r.ts_ms


def test_disabled_is_a_pass_through() -> None:
    _true, dev, tc = setup(enabled=False)
    r = reading_now(dev)
    assert tc.correct([r]) == [r]
    assert not tc.add_sample(1, 2, 3, 4)


@pytest.mark.parametrize(("key", "value"), [
    ("max_samples", 1), ("window_s", 0), ("keep_fraction", 0), ("keep_fraction", 1.5),
    ("max_delay_ms", 0), ("step_threshold_ms", -1), ("min_year", 1900), ("max_drift_ppm", 0),
    ("delay_factor", 0.5), ("delay_slack_ms", -1), ("drift_target_ppm", 0),
    ("rtc_slew_ppm", -1), ("backfill_s", -5), ("slew_rate", 0), ("slew_rate", 0.9),
    ("slew_max_ms", -1),
])
def test_config_errors_name_the_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as ei:
        convert({key: value}, TimeSyncConfig, section="timesync")
    assert ei.value.key == f"timesync.{key}"
