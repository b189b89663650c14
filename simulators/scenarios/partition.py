"""``partition``: one device group (a site behind a cut fibre) is isolated for hours while
the rest of the fleet keeps delivering; after the partition heals, the isolated group
catches up. Nothing is lost, nothing stored twice, the healthy group is unaffected."""

from __future__ import annotations

from simulators.fleet import DeviceSpec, Fleet, Group
from simulators.report import Report, weighted_percentiles
from simulators.scenarios import Options, base_checks
from simulators.sensors import WeatherGen

NAME = "partition"
SUMMARY = "one device group isolated for hours, the rest unaffected, then catch-up"
DEFAULTS = {"devices": 10, "hours": 12}
SHORT = {"devices": 4, "hours": 2}


async def run(opts: Options) -> Report:
    devices, hours = opts.resolved(DEFAULTS)
    cut = (hours / 4, hours / 4 + hours / 2)
    isolated = max(1, devices // 2)
    groups = [Group("site-a", isolated, loss=0.01, latency_s=0.05, outages_h=(cut,)),
              Group("site-b", max(0, devices - isolated), loss=0.01, latency_s=0.05)]
    groups = [g for g in groups if g.devices]

    def gens(dev: str, clock, n: int):  # type: ignore[no-untyped-def]
        return [WeatherGen(device_id=dev, clock=clock, seed=opts.seed * 1000 + n,
                           sensors=8, interval_s=2.0, batch_s=60.0, alarm_every_s=1800)]

    fleet = Fleet(name=NAME, groups=groups, gens=gens, spec=DeviceSpec(), seed=opts.seed,
                  root=opts.root, memory=opts.memory, progress=opts.progress, sample_s=120)
    try:
        rep = await fleet.run(hours, drain_hours=6)
    finally:
        fleet.close()
    attempts: dict[str, int] = {}
    lag: dict[str, list[tuple[float, int]]] = {}
    group_of = {d.id: d.group for d in fleet.devices}
    for dev, up in fleet.uplinks.items():
        attempts[group_of[dev]] = attempts.get(group_of[dev], 0) + up.attempts
    for dev_lag in fleet.cloud.lag_by_device.items():
        lag.setdefault(group_of[dev_lag[0]], []).extend(dev_lag[1])
    rep.extra["partition_h"] = f"{cut[0]:g}-{cut[1]:g}"
    rep.extra["attempts_by_group"] = attempts
    rep.extra["lag_p99_by_group_s"] = {g: weighted_percentiles(v, (99,)).get("p99", 0.0)
                                       for g, v in sorted(lag.items())}
    return rep


def check(rep: Report) -> list[str]:
    bad = base_checks(rep)
    lag = rep.extra.get("lag_p99_by_group_s", {})
    if "site-b" in lag and lag["site-b"] > 600:
        bad.append(f"the healthy group waited too: p99 lag {lag['site-b']} s")
    return bad
