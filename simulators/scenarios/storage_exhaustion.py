"""``storage-exhaustion``: a device stays offline until its disk fills. The buffer file is
capped for real (SQLite ``max_page_count``: writes past it fail with SQLITE_FULL, as on a
full disk) below the configured byte budget, so the agent hits the disk limit and evicts
by its documented policy: lowest priority first, oldest first, critical last. When the
link returns, what was kept is delivered."""

from __future__ import annotations

from simulators.fleet import DeviceSpec, Fleet, Group
from simulators.report import Report
from simulators.scenarios import Options, base_checks
from simulators.sensors import WeatherGen

NAME = "storage-exhaustion"
SUMMARY = "offline until the disk (a real 768 KiB file cap) fills; eviction by priority"
DEFAULTS = {"devices": 1, "hours": 24}
SHORT = {"devices": 1, "hours": 6}
QUOTA = 768 * 1024


async def run(opts: Options) -> Report:
    devices, hours = opts.resolved(DEFAULTS)
    groups = [Group("remote", devices, loss=0.0, latency_s=0.2, outages_h=((0.0, hours),))]
    spec = DeviceSpec(quota_bytes=QUOTA, config={
        "buffer": {"budget_bytes": 4 * 1024 * 1024},
        "priorities": [{"match": "temperature*", "priority": "high"}]})

    def gens(dev: str, clock, n: int):  # type: ignore[no-untyped-def]
        return [WeatherGen(device_id=dev, clock=clock, seed=opts.seed * 1000 + n,
                           sensors=40, interval_s=1.0, batch_s=60.0, alarm_every_s=600,
                           low=("wind", "solar", "rain"))]

    fleet = Fleet(name=NAME, groups=groups, gens=gens, spec=spec, seed=opts.seed,
                  root=opts.root, memory=opts.memory, progress=opts.progress, sample_s=300)
    try:
        rep = await fleet.run(hours, drain_hours=6)
    finally:
        fleet.close()
    rep.extra["file_quota_bytes"] = QUOTA
    rep.extra["budget_bytes"] = 4 * 1024 * 1024
    return rep


def check(rep: Report) -> list[str]:
    bad = base_checks(rep)
    ev = rep.evicted_by_priority
    if not ev:
        bad.append("the disk never filled: nothing evicted")
    if ev.get("normal", 0) and not ev.get("low", 0):
        bad.append("normal data evicted while low-priority data was kept")
    if ev.get("high", 0) and not ev.get("normal", 0):
        bad.append("high data evicted while normal data was kept")
    if not any(k.startswith("disk_full") for k in rep.evicted):
        bad.append("the file cap was never hit (no disk_full eviction)")
    return bad
