"""Simulator machinery: the quiescence time driver, CPU accounting, the constrained
device models, the fleet's cloud pieces, reports and the CLI."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import aiosqlite
import pytest

from pymigrate.clock import VirtualClock
from pymigrate.errors import ThrottledError
from simulators.cli import ProgressBar, main
from simulators.device import Battery, DeviceClock, StorageQuota, dir_bytes
from simulators.driver import CpuMeter, TimeDriver, current_device, stage_of
from simulators.fleet import DeviceSpec, Fleet, Group, TokenBucket, daily_outages
from simulators.report import Report, render_table, weighted_percentiles, write_chart
from simulators.sensors import WeatherGen


# ------------------------------------------------------------------ driver
async def test_driver_waits_for_thread_work_before_moving_time(tmp_path: Path) -> None:
    clock = VirtualClock()
    driver = TimeDriver(clock)
    driver.start()
    seen: list[tuple[float, int]] = []
    try:
        db = await aiosqlite.connect(tmp_path / "x.db")
        await db.execute("CREATE TABLE t (v INTEGER)")

        async def worker() -> None:
            for i in range(5):
                await clock.sleep(1.0)
                # a thread hop (sqlite), then an executor hop, then the next sleep:
                # the driver must not jump time while either is in flight
                await db.execute("INSERT INTO t VALUES (?)", (i,))
                await asyncio.to_thread(sum, range(1000))
                rows = await db.execute_fetchall("SELECT count(*) FROM t")
                seen.append((clock.monotonic(), int(next(iter(rows))[0])))

        task = asyncio.create_task(worker())
        await driver.run_until(10.0)
        await task
        await db.close()
    finally:
        driver.stop()
    assert seen == [(float(i + 1), i + 1) for i in range(5)]
    assert driver.steps >= 5
    assert aiosqlite.Connection._execute.__name__ == "_execute"  # restored


async def test_driver_until_and_on_step() -> None:
    clock = VirtualClock()
    driver = TimeDriver(clock)
    hits: list[float] = []

    async def ticker() -> None:
        while True:
            await clock.sleep(10)

    task = asyncio.create_task(ticker())
    done = await driver.run_until(1000, hits.append, until=lambda: clock.monotonic() >= 50)
    task.cancel()
    assert done and clock.monotonic() == 50 and hits[-1] == 50


async def test_driver_survives_a_busy_loop() -> None:
    clock = VirtualClock()
    driver = TimeDriver(clock)
    driver.spin_limit = 200
    stop = False

    async def spinner() -> None:
        while not stop:  # noqa: ASYNC110 - the busy loop under test
            await asyncio.sleep(0)

    task = asyncio.create_task(spinner())
    assert await driver.run_until(5.0) is False
    stop = True
    await task
    assert driver.spins >= 1 and clock.monotonic() == 5.0


async def test_cpu_meter_accounts_per_device_and_stage() -> None:
    loop = asyncio.get_running_loop()
    meter = CpuMeter()
    meter.install(loop)
    try:
        async def busy() -> None:
            sum(i * i for i in range(200_000))
            await asyncio.sleep(0)
            sum(i * i for i in range(200_000))

        token = current_device.set("dev-1")
        try:
            await asyncio.create_task(busy(), name="agent[ingest]")
        finally:
            current_device.reset(token)
        await asyncio.create_task(busy(), name="buffer[writer]")
    finally:
        meter.uninstall(loop)
    assert meter.by_stage("dev-1")["ingest"] > 0
    everything = meter.by_stage()
    assert everything["buffer"] > 0 and "sqlite-threads" in everything


def test_stage_names() -> None:
    assert stage_of("agent[uploader:sim:dev-1-5-a1-3]") == "uploader"
    assert stage_of("agent[ingest-append]") == "buffer"
    assert stage_of("buffer[timer]") == "buffer"
    assert stage_of("Task-12") == "other"


# ------------------------------------------------------------------ device models
def test_battery_and_device_clock() -> None:
    b = Battery(capacity_mj=10_000, idle_mw=1.0, wake_mj=100, per_byte_mj=0.01)
    b.idle_until(1000)
    b.send(1000, 10_000)
    assert b.used_mj == pytest.approx(1000 + 100 + 100)
    assert b.pct == pytest.approx(88.0) and b.sends == 1
    b.send(2000, 10 ** 9)
    assert b.pct == 0.0
    base = VirtualClock()
    c = DeviceClock(base, offset_ms=5000, drift_ppm=100)
    assert c.time_ms() == base.true_time_ms() + 5000
    c.jump_to(0)
    assert c.time_ms() == 0 and c.true_time_ms() == base.true_time_ms()


async def test_device_clock_sleeps_on_the_shared_clock() -> None:
    base = VirtualClock()
    c = DeviceClock(base, drift_ppm=1000)
    t = asyncio.create_task(c.sleep(5))
    await base.advance(5)
    await t
    assert c.monotonic() == 5 and c.time_ms() - base.true_time_ms() == 5
    t2 = asyncio.create_task(c.sleep_until(7))
    await base.advance(2)
    await t2


def test_storage_quota_measures_the_directory(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x" * 1000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"x" * 5000)  # not the state dir's own file
    q = StorageQuota(4096)
    assert q.measure(tmp_path) == 1000 == dir_bytes(tmp_path)
    (tmp_path / "a").write_bytes(b"x" * 3000)
    q.measure(tmp_path)
    (tmp_path / "a").write_bytes(b"x")
    q.measure(tmp_path)
    assert q.peak_dir_bytes == 3000
    assert dir_bytes(tmp_path / "missing") == 0


def test_storage_quota_is_the_disk_the_buffer_sees(tmp_path: Path) -> None:
    probes: list[Callable[[Path], int | None]] = []

    class Buffer:
        def watch_disk(self, free: Callable[[Path], int | None]) -> None:
            probes.append(free)

    q = StorageQuota(4096)
    q.install(SimpleNamespace(buffer=Buffer()), tmp_path)  # type: ignore[arg-type]
    (tmp_path / "buffer.db").write_bytes(b"x" * 1000)
    (tmp_path / "buffer.db-wal").write_bytes(b"x" * 2000)  # the WAL is on the disk too
    assert probes[0](tmp_path) == 4096 - 3000 and q.peak_dir_bytes == 3000
    (tmp_path / "buffer.db.reserve").write_bytes(b"x" * 2000)
    assert probes[0](tmp_path) == 0  # full: never negative
    StorageQuota(None).install(SimpleNamespace(buffer=Buffer()), tmp_path)  # type: ignore[arg-type]
    assert len(probes) == 1  # no quota: the buffer keeps statvfs


# ------------------------------------------------------------------ fleet pieces
def test_token_bucket_throttles_with_retry_after() -> None:
    clock = VirtualClock()
    tb = TokenBucket(0.5, 2, clock)
    tb.check("a")
    tb.check("a")
    with pytest.raises(ThrottledError) as ei:
        tb.check("a")
    assert ei.value.retry_after_s >= 1.0 and tb.throttled == 1


def test_daily_outages_leave_exactly_the_window_open() -> None:
    out = daily_outages(48, 0.0, 1.5, start_h=1.0)
    def up(t: float) -> bool:
        return not any(a <= t < b for a, b in out)
    assert up(0.25) and not up(0.6) and not up(22.9)
    assert up(23.0) and up(24.4) and not up(24.6) and up(47.2)


async def run_tiny(seed: int) -> Report:
    groups = [Group("g", 2, loss=0.05, latency_s=0.1, outages_h=((0.2, 0.5),))]
    fleet = Fleet(name="tiny", groups=groups, seed=seed, spec=DeviceSpec(battery=True),
                  gens=lambda d, c, n: [WeatherGen(device_id=d, clock=c, sensors=3,
                                                   interval_s=5, batch_s=60,
                                                   alarm_every_s=600, seed=n)],
                  memory=True, sample_s=600)
    try:
        return await fleet.run(1.0, drain_hours=2)
    finally:
        fleet.close()


async def test_fleet_run_is_deterministic_and_accounts_everything() -> None:
    a = await run_tiny(7)
    b = await run_tiny(7)
    for field in ("produced", "accepted", "delivered", "wire_bytes", "attempts",
                  "batches_failed", "lag_s"):
        assert getattr(a, field) == getattr(b, field), field
    assert a.lost == 0 and a.duplicates_stored == 0 and a.all_delivered
    # 3 sensors every 5 s and an alarm every 10 min, for 1 h (+ the batch in progress
    # when the sources stop)
    assert a.produced == a.delivered >= 2 * (3 * 720 + 6)
    assert a.batches_failed > 0  # the outage was felt
    assert a.peak_memory_bytes > 0 and a.peak_agent_heap_bytes > 0
    assert a.battery_min_pct is not None and a.battery_min_pct < 100
    assert a.cpu_by_stage["ingest"] > 0 and a.timeline


# ------------------------------------------------------------------ report + CLI
def test_weighted_percentiles() -> None:
    assert weighted_percentiles([]) == {}
    p = weighted_percentiles([(1.0, 98), (10.0, 1), (100.0, 1)])
    assert p == {"p50": 1.0, "p95": 1.0, "p99": 10.0, "max": 100.0}


def sample_report() -> Report:
    return Report(scenario="s", devices=1, hours=1, seed=1, produced=10, accepted=10,
                  delivered=10, evicted={"budget:low": 2}, lag_s={"p50": 30.0, "max": 9000.0},
                  lag_p99_by_priority_s={"critical": 200.0}, battery_min_pct=50.0,
                  cpu_by_stage={"ingest": 0.1}, extra={"variants": {"a": 1}, "note": "x"},
                  timeline=[{"t_h": 0.0, "backlog_bytes": 0, "delivered": 0, "wire_bytes": 0},
                            {"t_h": 1.0, "backlog_bytes": 5, "delivered": 10,
                             "wire_bytes": 900}],
                  unexplained_extra=1)


def test_render_table_and_json() -> None:
    rep = sample_report()
    text = render_table(rep)
    assert "LOST" in text and "budget:low 2" in text and "2.50h" in text and "3.3m" in text
    assert "unexplained extra 1" in text and "battery" in text
    data = json.loads(rep.to_json())
    assert "timeline" not in data and data["produced"] == 10
    assert "timeline" in json.loads(rep.to_json(timeline=True))


def test_chart(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "c.png"
    assert write_chart(sample_report(), out) and out.read_bytes()[:4] == b"\x89PNG"
    empty = Report(scenario="s", devices=1, hours=1, seed=1)
    assert not write_chart(empty, tmp_path / "none.png")


def test_chart_without_matplotlib(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import builtins

    real = builtins.__import__

    def fake(name: str, *a: object, **k: object) -> object:
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", fake)
    assert not write_chart(sample_report(), tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()


def test_cli_list_and_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert "weather-stations" in listed and "rate-limited" in listed
    assert main([]) == 2
    assert main(["nope"]) == 2
    assert main(["partition", "--devices", "0"]) == 2
    assert "unknown scenario" in capsys.readouterr().err
    from simulators.scenarios import get

    run, check = get("partition")
    assert callable(run) and callable(check)


def test_cli_runs_a_scenario_with_table_chart_and_progress(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    stream = io.StringIO()
    bars: list[ProgressBar] = []

    def factory(total: float) -> ProgressBar:
        bars.append(ProgressBar(total, stream=stream, force=True))
        return bars[-1]

    chart = tmp_path / "c.png"
    rc = main(["corrupt-buffer", "--devices", "1", "--hours", "1", "--chart", str(chart)],
              progress_factory=factory)
    out = capsys.readouterr()
    assert rc == 0, out.out
    assert "checks: all passed" in out.out and "quarantined" in out.out
    assert "h simulated" in stream.getvalue() and stream.getvalue().endswith("\n")
    assert chart.exists() or "chart skipped" in out.err


def test_progress_bar_quiet_when_not_a_tty() -> None:
    s = io.StringIO()
    bar = ProgressBar(10, stream=s)
    bar(5)
    bar.close()
    assert s.getvalue() == ""


async def test_sim_device_lifecycle_crash_restart_and_counts(tmp_path: Path) -> None:
    from simulators.scenarios import base_checks

    fleet = Fleet(name="life", groups=[Group("g", 1)], root=tmp_path, seed=3,
                  gens=lambda d, c, n: [WeatherGen(device_id=d, clock=c, sensors=2,
                                                   interval_s=10, batch_s=60)])
    fleet._build()
    fleet.driver.start()
    try:
        await fleet.cloud.store.open()
        dev = fleet.devices[0]
        assert dev.quarantined_readings() == 0  # no buffer file yet
        await dev.stop()  # not started: nothing to do
        await dev.start()
        await fleet.driver.run_until(1800)
        running = dev.live()
        assert running["accepted"] > 0 and running["delivered"] > 0
        await dev.stop(crash=True)  # a power cut: cancelled, state stays on disk
        assert dev.agent is None and dev.totals["accepted"] == running["accepted"]
        assert dev.sample() == (0, 0)
        await dev.start()
        assert dev.incarnations == 2
        await fleet.driver.run_until(3600)
        await fleet.drive(dev.restart(), limit_h=1)
        assert dev.incarnations == 3 and dev.live()["accepted"] > running["accepted"]
        await fleet.drive(dev.stop())
        with pytest.raises(TimeoutError):
            await fleet.drive(asyncio.Event().wait(), limit_h=0.01)
    finally:
        fleet.driver.stop()
        await fleet.cloud.store.close()
    rep = Report(scenario="x", devices=1, hours=1, seed=1, produced=5, lost=2,
                 unexplained_extra=1, duplicates_stored=1,
                 evicted_by_priority={"critical": 1},
                 produced_by_priority={"critical": 2})
    assert len(base_checks(rep)) == 7
    assert base_checks(Report(scenario="x", devices=1, hours=1, seed=1), delivered=False) == []


async def test_sim_device_start_failure_is_raised(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the data directory should be")
    fleet = Fleet(name="bad", groups=[Group("g", 1)], root=blocker,
                  gens=lambda d, c, n: [WeatherGen(device_id=d, clock=c, sensors=1)])
    fleet._build()
    with pytest.raises(OSError):
        await fleet.devices[0].start()
