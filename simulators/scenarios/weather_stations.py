"""``weather-stations``: remote stations on a satellite link with one connectivity window a
day (00:00-01:30 UTC), over several days. The run starts at 01:00 UTC, just after a window:
each day's data waits on the station for almost a day, then goes up in the window."""

from __future__ import annotations

from simulators.fleet import DeviceSpec, Fleet, Group, daily_outages
from simulators.report import Report
from simulators.scenarios import Options, base_checks
from simulators.sensors import WeatherGen

NAME = "weather-stations"
SUMMARY = "remote stations, one satellite window per day (00:00-01:30 UTC) for days"
DEFAULTS = {"devices": 3, "hours": 72}
SHORT = {"devices": 1, "hours": 24}
WINDOW = ("00:00", "01:30")
WINDOW_H = (0.0, 1.5)
START_H = 1.0  # UTC hour at t = 0 (simulators.fleet.START_MS)


def in_window(t_h: float) -> bool:
    """True when simulated hour ``t_h`` falls in a daily window."""
    utc = (START_H + t_h) % 24
    return WINDOW_H[0] <= utc < WINDOW_H[1] or abs(utc - WINDOW_H[1]) < 1e-6


async def run(opts: Options) -> Report:
    devices, hours = opts.resolved(DEFAULTS)
    outages = daily_outages(hours, *WINDOW_H, start_h=START_H)
    half = max(1, devices // 2)
    groups = [Group("sat", half, loss=0.03, latency_s=0.35, jitter_s=0.1,
                    bandwidth_bps=128_000, outages_h=outages)]
    if devices > half:
        groups.append(Group("vsat", devices - half, loss=0.01, latency_s=0.3,
                            bandwidth_bps=512_000, outages_h=outages))
    spec = DeviceSpec(config={"retry": {"windows": [f"{WINDOW[0]}-{WINDOW[1]}"],
                                        "profile": "metered"}})

    def gens(dev: str, clock, n: int):  # type: ignore[no-untyped-def]
        return [WeatherGen(device_id=dev, clock=clock, seed=opts.seed * 1000 + n,
                           sensors=10, interval_s=1.0, batch_s=60.0, alarm_every_s=3 * 3600)]

    fleet = Fleet(name=NAME, groups=groups, gens=gens, spec=spec, seed=opts.seed,
                  root=opts.root, memory=opts.memory, progress=opts.progress)
    try:
        rep = await fleet.run(hours, drain_hours=30)
    finally:
        fleet.close()
    last = max((t for t, *_ in fleet.cloud.deliveries), default=0.0) / 3600.0
    rep.extra["last_delivery_h"] = round(last, 3)
    rep.extra["last_delivery_in_window"] = in_window(last)
    rep.extra["readings_per_station_day"] = round(rep.produced / max(devices, 1)
                                                  / max(hours / 24, 1e-9))
    return rep


def check(rep: Report) -> list[str]:
    bad = base_checks(rep)
    if rep.peak_buffer_bytes >= 10_000_000:
        bad.append(f"a day buffered takes {rep.peak_buffer_bytes} B (>= 10 MB)")
    if not rep.extra.get("last_delivery_in_window"):
        bad.append("data delivered outside the connectivity window")
    return bad
