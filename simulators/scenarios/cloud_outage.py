"""``cloud-outage``: the cloud is down for hours (every request fails: 503 or no answer),
then comes back and the whole fleet's backlog arrives at once (the recovery stampede).
The report shows the request rate the cloud sees after recovery and how long the
backlog takes to drain; backoff with jitter and throttling keep the stampede bounded."""

from __future__ import annotations

from simulators.fleet import HOUR, DeviceSpec, Fleet, Group
from simulators.report import Report
from simulators.scenarios import Options, base_checks
from simulators.sensors import WeatherGen

NAME = "cloud-outage"
SUMMARY = "hours-long cloud outage, then the recovery stampede of a whole fleet"
DEFAULTS = {"devices": 50, "hours": 12}
SHORT = {"devices": 8, "hours": 1.5}


async def run(opts: Options) -> Report:
    devices, hours = opts.resolved(DEFAULTS)
    out_from, out_to = hours / 6, hours / 6 + hours / 3  # e.g. 2 h .. 6 h of 12 h
    regions = [("eu", 0.01, 0.05), ("us", 0.01, 0.08), ("apac", 0.03, 0.2)]
    per = max(1, devices // len(regions))
    groups = []
    left = devices
    for i, (name, loss, lat) in enumerate(regions):
        n = left if i == len(regions) - 1 else min(per, left)
        if n > 0:
            groups.append(Group(name, n, loss=loss, latency_s=lat, bandwidth_bps=2_000_000))
        left -= n
    spec = DeviceSpec(config={"retry": {"backoff_cap_s": 300.0}})

    def gens(dev: str, clock, n: int):  # type: ignore[no-untyped-def]
        return [WeatherGen(device_id=dev, clock=clock, seed=opts.seed * 1000 + n,
                           sensors=5, interval_s=5.0, batch_s=60.0, alarm_every_s=1800)]

    # the recovering cloud admits 20 batches/s for the fleet (burst 40)
    fleet = Fleet(name=NAME, groups=groups, gens=gens, spec=spec, seed=opts.seed,
                  limiter=(20.0, 40.0), cloud_outages_h=[(out_from, out_to)],
                  root=opts.root, memory=opts.memory, progress=opts.progress, sample_s=120)
    try:
        rep = await fleet.run(hours, drain_hours=12)
    finally:
        fleet.close()
    req = fleet.cloud.requests
    during = [req.get(m, 0) for m in range(int(out_from * 60), int(out_to * 60))]
    after = [req.get(m, 0) for m in range(int(out_to * 60), int(out_to * 60) + 60)]
    rep.extra["outage_h"] = f"{out_from:g}-{out_to:g}"
    rep.extra["requests_per_min_during_outage_peak"] = max(during, default=0)
    rep.extra["requests_per_min_after_recovery_peak"] = max(after, default=0)
    pre = [p["backlog_readings"] for p in fleet.timeline if p["t_h"] < out_from]
    base = max(pre, default=0)
    caught = next((p["t_h"] for p in fleet.timeline
                   if p["t_h"] > out_to and p["backlog_readings"] <= base), None)
    rep.extra["backlog_peak_readings"] = max((p["backlog_readings"] for p in fleet.timeline),
                                             default=0)
    rep.extra["catch_up_minutes_after_recovery"] = (
        None if caught is None else round((caught - out_to) * 60, 1))
    rep.extra["outage_s"] = round((out_to - out_from) * HOUR)
    return rep


def check(rep: Report) -> list[str]:
    bad = base_checks(rep)
    if rep.extra.get("catch_up_minutes_after_recovery") is None:
        bad.append("the backlog never came back to its pre-outage level")
    if not rep.batches_failed:
        bad.append("no failed attempts: the outage was not exercised")
    return bad
