"""Time correction is order preserving: read skew between the wall and monotonic reads,
readings stamped before the first observation, readings that fit no regime."""

from __future__ import annotations

import itertools
import random

import pytest

from agent.timesync import TimeCorrector, TimeSyncConfig
from pymigrate.clock import VirtualClock
from pymigrate.types import Quality, Reading

T0 = 1_767_225_600_000


class SkewClock:
    """A gateway's clocks over a VirtualClock (true time), read by a process that can be
    preempted between two reads: each read happens a random delay after the previous
    one (mostly microseconds, ``p_preempt`` of reads up to ``max_skew_ms`` later), so
    ``monotonic()`` and ``time_ms()`` read back to back see different instants. The RTC
    is ``offset_ms`` off and may slew (run ``wall_slew_ppm`` faster than the monotonic clock).
    """

    def __init__(self, true: VirtualClock, rng: random.Random, *, offset_ms: float = 0.0,
                 wall_slew_ppm: float = 0.0, max_skew_ms: float = 30.0,
                 p_preempt: float = 0.3) -> None:
        self.true, self.rng = true, rng
        self.offset_ms, self.slew = offset_ms, wall_slew_ppm * 1e-6
        self.max_skew_ms, self.p_preempt = max_skew_ms, p_preempt
        self.h = true.monotonic()  # instant of the last read (s)
        self.reads = 0

    def _read(self) -> float:
        self.reads += 1
        if self.rng.random() < self.p_preempt:
            d = self.rng.uniform(0.5, self.max_skew_ms) / 1000.0
        else:
            d = self.rng.uniform(0.0, 0.05) / 1000.0
        self.h = max(self.h, self.true.monotonic()) + d
        return self.h

    def wall_at(self, mono_s: float) -> int:
        return int(T0 + self.offset_ms + mono_s * 1000.0 * (1.0 + self.slew))

    def rtc_now(self) -> int:
        """The RTC at the current true instant (how a source stamps a reading)."""
        return self.wall_at(self.true.monotonic())

    def monotonic(self) -> float:
        return self._read()

    def time_ms(self) -> int:
        return self.wall_at(self._read())

    async def sleep(self, seconds: float) -> None:  # pragma: no cover - Clock protocol only
        await self.true.sleep(seconds)

    async def sleep_until(self, deadline: float) -> None:  # pragma: no cover
        await self.true.sleep_until(deadline)


def make(seed: int, **kw: object) -> tuple[VirtualClock, SkewClock, TimeCorrector]:
    true = VirtualClock(T0)
    cfg = {k: v for k, v in kw.items() if k in TimeSyncConfig.__struct_fields__}
    clk_kw = {k: v for k, v in kw.items() if k not in cfg}
    dev = SkewClock(true, random.Random(seed), **clk_kw)  # type: ignore[arg-type]
    return true, dev, TimeCorrector(TimeSyncConfig(**cfg), clock=dev)  # type: ignore[arg-type]


async def ack(true: VirtualClock, dev: SkewClock, tc: TimeCorrector, rng: random.Random,
              jitter_ms: float = 0.3) -> None:
    """One loopback-like exchange (about 1 ms each way); server times are true time."""
    t1 = dev.time_ms()
    # the request leaves after t1 was read (the reader may have been preempted)
    await true.advance(max(0.0, dev.h - true.monotonic()))
    await true.advance((0.5 + rng.random() * jitter_ms) / 1000)
    t2 = true.true_time_ms()
    await true.advance(0.001)
    t3 = true.true_time_ms()
    await true.advance((0.5 + rng.random() * jitter_ms) / 1000)
    tc.add_sample(t1, t2, t3, dev.time_ms())


async def stream(true: VirtualClock, dev: SkewClock, tc: TimeCorrector, rng: random.Random,
                 *, seconds: float, sensors: int = 3, acks_every_s: float | None = None,
                 pending: list[tuple[Reading, int]] | None = None,
                 exchange: tuple[float, float] | None = None
                 ) -> list[tuple[str, int, int, int]]:
    """100 Hz readings of ``sensors`` sensors (sometimes a tick repeats a raw time, like a
    source catching up), corrected in batches of random size at random moments.
    Returns (sensor, raw, ts, true time) per reading; readings not yet corrected at the
    end stay in ``pending`` (when given) for the next call. ``exchange`` = (up, down) ms:
    one upload + ack in flight while the readings keep coming (server times are true)."""
    out: list[tuple[str, int, int, int]] = []
    pending = [] if pending is None else pending
    next_ack = acks_every_s
    elapsed = 0.0
    flight: list[float] | None = None  # [t1, due (s), down ms, t2 or -1]
    if exchange is not None:
        t1 = dev.time_ms()
        flight = [t1, max(dev.h, true.monotonic()) + exchange[0] / 1000, exchange[1], -1.0]
    while elapsed < seconds:
        if flight is not None and true.monotonic() >= flight[1]:
            if flight[3] < 0:  # reached the server; the ack leaves 1 ms later
                flight[3] = true.true_time_ms()
                flight[1] = true.monotonic() + (1 + flight[2]) / 1000
            else:
                t2 = int(flight[3])
                tc.add_sample(int(flight[0]), t2, t2 + 1, dev.time_ms())
                flight = None
        raw = dev.rtc_now()
        repeats = 2 if rng.random() < 0.02 else 1
        for _ in range(repeats):
            for j in range(sensors):
                pending.append((Reading("gw", f"s{j}", raw, 1.0), true.true_time_ms()))
        step = 0.01 + rng.uniform(0, 0.002)
        await true.advance(step)
        elapsed += step
        if rng.random() < 0.15:  # a batch reaches the corrector
            await true.advance(rng.uniform(0, 0.05))
            for (r, t_true), c in zip(pending, tc.correct([r for r, _ in pending]),
                                      strict=True):
                out.append((c.sensor, r.ts_ms, c.ts_ms, t_true))
            pending.clear()
        if next_ack is not None and elapsed >= next_ack:
            await ack(true, dev, tc, rng)
            next_ack += acks_every_s or 0.0
    return out


def assert_order_preserving(rows: list[tuple[str, int, int, int]]) -> None:
    by_key: dict[tuple[str, int], int] = {}
    for sensor, raw, ts, _ in rows:  # identical raw times map identically
        assert by_key.setdefault((sensor, raw), ts) == ts, (sensor, raw)
    for sensor in {s for s, *_ in rows}:
        pairs = sorted({(raw, ts) for s, raw, ts, _ in rows if s == sensor})
        for (r0, t0), (r1, t1) in itertools.pairwise(pairs):
            assert t1 >= t0, f"{sensor}: raw {r0} -> {t0}, raw {r1} -> {t1}"
            if r1 - r0 >= 2:
                assert t1 > t0, f"{sensor}: raw {r0} and {r1} both -> {t0}"


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_read_skew_does_not_make_corrections_jitter(seed: int) -> None:
    rng = random.Random(seed)
    true, dev, tc = make(seed, offset_ms=-40_000)
    for _ in range(5):
        await ack(true, dev, tc, rng)
        await true.advance(0.2)
    rows = await stream(true, dev, tc, rng, seconds=6.0)
    assert_order_preserving(rows)
    # fixed model: the correction is one function of the raw time, whenever applied
    shifts = {ts - raw for _, raw, ts, _ in rows}
    assert max(shifts) - min(shifts) <= 1
    errors = [abs(ts - t) for _, _, ts, t in rows]
    assert max(errors) <= 5
    assert tc.status()["jumps"] == 0


@pytest.mark.parametrize("seed", [4, 5])
async def test_order_kept_while_acks_keep_arriving(seed: int) -> None:
    rng = random.Random(seed)
    true, dev, tc = make(seed, offset_ms=25_000)
    await ack(true, dev, tc, rng)
    assert tc.synced()
    rows = await stream(true, dev, tc, rng, seconds=8.0, acks_every_s=0.3)
    assert_order_preserving(rows)
    assert max(abs(ts - t) for _, _, ts, t in rows) <= 16  # ack read skew / 2 + 1
    assert tc.counters["small_steps"] == 0


async def test_slow_slew_is_tracked_without_jumps() -> None:
    rng = random.Random(7)
    # the RTC is slewed 400 ppm faster than the monotonic clock for an hour: 1.44 s
    true, dev, tc = make(7, wall_slew_ppm=400.0, max_skew_ms=10.0)
    await ack(true, dev, tc, rng)
    worst = 0
    for _ in range(360):
        await true.advance(10.0)
        await ack(true, dev, tc, rng)
        r = Reading("gw", "t", dev.rtc_now(), 1.0)
        out = tc.correct([r])[0]
        worst = max(worst, abs(out.ts_ms - true.true_time_ms()))
    assert dev.rtc_now() - true.true_time_ms() > 1400
    assert worst <= 8  # skew of the acks / 2 + slew between observations + 1
    st = tc.status()
    assert st["jumps"] == 0 and st["small_steps"] == 0


async def test_step_under_skew_detected_once() -> None:
    rng = random.Random(8)
    true, dev, tc = make(8, max_skew_ms=200.0)
    for _ in range(50):
        await ack(true, dev, tc, rng)
        await true.advance(0.5)
    assert tc.status()["jumps"] == 0  # 200 ms preemptions are not jumps
    before = Reading("gw", "t", dev.rtc_now(), 1.0)
    t_before = true.true_time_ms()
    dev.offset_ms -= 5_000
    await true.advance(0.5)
    after = Reading("gw", "t", dev.rtc_now(), 1.0)
    out_b, out_a = tc.correct([before, after])
    for _ in range(20):
        await ack(true, dev, tc, rng)
        await true.advance(0.5)
    st = tc.status()
    assert st["jumps"] == 1 and st["backward_steps"] == 1
    assert abs(out_b.ts_ms - t_before) <= 5
    assert abs(out_a.ts_ms - (t_before + 500)) <= 5


async def test_readings_stamped_before_first_observation_fit_the_first_regime() -> None:
    rng = random.Random(9)
    true, dev, tc = make(9, offset_ms=3_000, p_preempt=0.0, backfill_s=60.0)
    # an agent restart: the source redelivers readings stamped before the corrector
    # existed; the first observation is the sync burst
    old = []
    for gap_s in (160.0, 30.0, 10.0):  # stamped 200 s, 40 s and 10 s before
        old.append((Reading("gw", "t", dev.rtc_now(), 1.0), true.true_time_ms()))
        await true.advance(gap_s)
    for _ in range(3):
        await ack(true, dev, tc, rng)
    out = tc.correct([r for r, _ in old])
    stale, *fitted = out
    for o, (_, t_true) in zip(fitted, old[1:], strict=True):
        assert o.quality == Quality.TIME_CORRECTED  # not anchored at arrival
        assert abs(o.ts_ms - t_true) <= 5
    # older than backfill_s: it fits no regime
    assert stale.quality == (Quality.TIME_CORRECTED | Quality.TIME_ANCHORED
                             | Quality.TIME_UNCERTAIN)
    assert len({o.ts_ms for o in out}) == 3


async def test_burst_that_fits_no_regime_keeps_its_spacing() -> None:
    rng = random.Random(10)
    true, dev, tc = make(10, p_preempt=0.0)
    tc.correct([])
    ahead = dev.rtc_now() + 86_400_000  # a sensor with its own RTC a day ahead
    burst = [Reading("gw", "x", ahead + 10 * i, 1.0) for i in range(5)]
    burst.append(Reading("gw", "x", ahead + 40, 2.0))  # a repeated raw time
    burst.append(Reading("gw2", "y", ahead - 500, 1.0))  # anchored by its own device
    out = tc.correct(burst)  # unsynced, RTC trusted: anchored on the wall clock
    now = true.true_time_ms()
    assert [o.ts_ms - now for o in out] == [-40, -30, -20, -10, 0, 0, 0]
    assert all(o.quality == Quality.TIME_ANCHORED | Quality.TIME_UNCERTAIN for o in out)
    assert [o.raw_ts_ms for o in out] == [r.ts_ms for r in burst]
    await ack(true, dev, tc, rng)
    out = tc.correct(burst)  # synced: same spacing, corrected at arrival
    now = true.true_time_ms()
    assert [o.ts_ms - out[4].ts_ms for o in out] == [-40, -30, -20, -10, 0, 0, 0]
    assert abs(out[4].ts_ms - now) <= 3
    assert all(o.quality == (Quality.TIME_CORRECTED | Quality.TIME_ANCHORED
                             | Quality.TIME_UNCERTAIN) for o in out)


async def noisy_ack(true: VirtualClock, dev: SkewClock, tc: TimeCorrector, up_ms: float,
                    down_ms: float) -> None:
    t1 = dev.time_ms()
    await true.advance(max(0.0, dev.h - true.monotonic()) + up_ms / 1000)
    t2 = true.true_time_ms()
    await true.advance(0.001)
    t3 = true.true_time_ms()
    await true.advance(down_ms / 1000)
    tc.add_sample(t1, t2, t3, dev.time_ms())


@pytest.mark.parametrize("seed", [11, 12, 13])
async def test_model_updates_are_slewed_so_order_is_kept(seed: int) -> None:
    rng = random.Random(seed)
    true, dev, tc = make(seed, offset_ms=-7_000, max_skew_ms=5.0)
    rows: list[tuple[str, int, int, int]] = []
    carry: list[tuple[Reading, int]] = []  # stamped before an ack, corrected after it
    worst_late = 0
    for i in range(30):
        # the first sample is ~30 ms off, the next ones pull the model down by ~30 ms
        # (stepped, readings 10 ms apart would swap order), then noisy acks; the
        # readings keep coming while an ack is in flight
        up, down = ((60.0, 1.0) if i == 0 else (1.0, 1.0) if i < 3
                    else (rng.uniform(1, 80), rng.uniform(1, 80)))
        part = await stream(true, dev, tc, rng, seconds=0.3, sensors=2, pending=carry,
                            exchange=(up, down))
        rows += part
        if i >= 20:
            worst_late = max([worst_late, *(abs(ts - t) for _, _, ts, t in part)])
    assert_order_preserving(rows)
    assert worst_late <= 15  # follows the model (the first sample was 30 ms off)


async def test_large_model_change_steps_small_one_slews() -> None:
    true, dev, tc = make(13, p_preempt=0.0, slew_rate=0.05, slew_max_ms=128.0)
    await noisy_ack(true, dev, tc, 1500.0, 20.0)  # queued uplink: ~740 ms off
    r = Reading("gw", "t", dev.rtc_now(), 1.0)
    assert tc.correct([r])[0].ts_ms - true.true_time_ms() > 500
    await noisy_ack(true, dev, tc, 20.0, 2.0)  # a good sample (9 ms off): a step
    await true.advance(0.01)
    out = tc.correct([Reading("gw", "t", dev.rtc_now(), 1.0)])[0]
    assert 8 <= out.ts_ms - true.true_time_ms() <= 10 <= out.uncert_ms
    # a better sample moves the model by ~4.5 ms (median of the two good ones), applied
    # at 5% (0.5 ms per 10 ms): slewed in over ~90 ms, not stepped
    await noisy_ack(true, dev, tc, 1.0, 1.0)
    errs = []
    for _ in range(15):
        await true.advance(0.01)
        c = tc.correct([Reading("gw", "t", dev.rtc_now(), 1.0)])[0]
        errs.append((c.ts_ms - true.true_time_ms(), c.uncert_ms))
    assert all(abs(e) <= u for e, u in errs)
    assert 8 <= errs[0][0] <= 10 and 4 <= errs[-1][0] <= 5  # slewed in, not stepped
    assert sorted(e for e, _ in errs) == [e for e, _ in reversed(errs)]
    off = tc.offset_ms()
    assert off is not None and 3 <= off - (true.true_time_ms() - dev.rtc_now()) <= 6


async def test_a_corrected_time_is_never_revised_by_a_later_model() -> None:
    true, dev, tc = make(14, p_preempt=0.0)
    await noisy_ack(true, dev, tc, 40.0, 2.0)  # 19 ms off
    await true.advance(0.5)
    r = Reading("gw", "t", dev.rtc_now(), 1.0)
    first = tc.correct([r])[0]
    await true.advance(0.5)
    late = Reading("gw", "t", dev.rtc_now(), 1.0)  # stamped before the next ack
    for _ in range(2):  # the model moves ~19 ms (median of three)
        await noisy_ack(true, dev, tc, 2.0, 2.0)
    again, late_out = tc.correct([r, late])  # e.g. a QoS 1 redelivery of r
    assert again.ts_ms == first.ts_ms
    assert late_out.ts_ms - late.ts_ms <= first.ts_ms - r.ts_ms - 15  # the new model
    await true.advance(2.0)
    now = tc.correct([Reading("gw", "t", dev.rtc_now(), 1.0)])[0]
    assert abs(now.ts_ms - true.true_time_ms()) <= 2


@pytest.mark.parametrize("seed", [16, 17, 19])
async def test_first_sync_slews_from_the_rtc_time_when_close(seed: int) -> None:
    rng = random.Random(seed)
    # an NTP-disciplined gateway whose RTC is 40 ms ahead: readings go out unsynced
    # (raw time) until the first ack; then the correction (-40 ms) must not swap them
    true, dev, tc = make(seed, offset_ms=40.0, max_skew_ms=5.0)
    carry: list[tuple[Reading, int]] = []
    rows = await stream(true, dev, tc, rng, seconds=0.5, sensors=2, pending=carry)
    assert rows and tc.status()["state"] == "unsynced"
    rows += await stream(true, dev, tc, rng, seconds=0.3, sensors=2, pending=carry,
                         exchange=(2.0, 2.0))
    assert tc.synced()
    rows += await stream(true, dev, tc, rng, seconds=1.0, sensors=2, pending=carry)
    assert_order_preserving(rows)
    tail = rows[-10:]
    assert max(abs(ts - t) for _, _, ts, t in tail) <= 3  # slewed in by then


async def test_first_sync_far_off_covers_the_past() -> None:
    true, dev, tc = make(17, offset_ms=-600_000, p_preempt=0.0)
    r = Reading("gw", "t", dev.rtc_now(), 1.0)
    t_r = true.true_time_ms()
    assert tc.correct([r])[0].ts_ms == r.ts_ms  # unsynced: the RTC's time
    await noisy_ack(true, dev, tc, 2.0, 2.0)
    out = tc.correct([r])[0]  # re-sent after the first ack: 10 minutes off, corrected
    assert abs(out.ts_ms - t_r) <= 2 and out.quality == Quality.TIME_CORRECTED
