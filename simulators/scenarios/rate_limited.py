"""``rate-limited``: devices come online with hours of backlog and the cloud API admits
only a trickle of batches (token bucket, HTTP 429 with retry-after). Devices obey
retry-after (with jitter), keep nothing in a retry storm, and deliver everything."""

from __future__ import annotations

from simulators.fleet import DeviceSpec, Fleet, Group
from simulators.report import Report
from simulators.scenarios import Options, base_checks
from simulators.sensors import WeatherGen

NAME = "rate-limited"
SUMMARY = "cloud API throttles bulk uploads (429 + retry-after) after a backlog builds"
DEFAULTS = {"devices": 20, "hours": 8}
SHORT = {"devices": 4, "hours": 1}


async def run(opts: Options) -> Report:
    devices, hours = opts.resolved(DEFAULTS)
    offline = (0.0, hours / 2)
    groups = [Group("field", devices, loss=0.01, latency_s=0.1, outages_h=(offline,))]
    spec = DeviceSpec(config={"retry": {"batch_max_bytes": 16 * 1024}})

    def gens(dev: str, clock, n: int):  # type: ignore[no-untyped-def]
        return [WeatherGen(device_id=dev, clock=clock, seed=opts.seed * 1000 + n,
                           sensors=10, interval_s=1.0, batch_s=60.0, alarm_every_s=1800)]

    # 0.2 batches/s for the whole fleet, burst 2
    fleet = Fleet(name=NAME, groups=groups, gens=gens, spec=spec, seed=opts.seed,
                  limiter=(0.2, 2.0), root=opts.root, memory=opts.memory,
                  progress=opts.progress, sample_s=120)
    try:
        rep = await fleet.run(hours, drain_hours=24)
    finally:
        fleet.close()
    lim = fleet.cloud.limiter
    rep.extra["cloud_throttled_requests"] = lim.throttled if lim else 0
    rep.extra["peak_requests_per_min"] = max(fleet.cloud.requests.values(), default=0)
    return rep


def check(rep: Report) -> list[str]:
    bad = base_checks(rep)
    if not rep.batches_throttled:
        bad.append("no batch was throttled: the limit was not exercised")
    # a token bucket of 0.2/s admits 12/min (+ burst); obeying devices stay near it
    if rep.extra.get("peak_requests_per_min", 0) > 200:
        bad.append(f"retry storm: {rep.extra['peak_requests_per_min']} requests in a minute")
    return bad
