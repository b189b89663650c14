"""``industrial-burst``: machines whose vibration sensors burst to 100 Hz during machine
events, while the plant's uplink is congested (low bandwidth, loss, two 30-minute
collapses) and the cloud API throttles the fleet. Alarms are critical and must arrive
first; bulky vibration is low priority."""

from __future__ import annotations

from simulators.fleet import DeviceSpec, Fleet, Group
from simulators.report import Report
from simulators.scenarios import Options, base_checks
from simulators.sensors import IndustrialGen

NAME = "industrial-burst"
SUMMARY = "100 Hz vibration bursts during congestion (loss, collapses) and cloud throttling"
DEFAULTS = {"devices": 4, "hours": 12}
SHORT = {"devices": 2, "hours": 1.5}


async def run(opts: Options) -> Report:
    devices, hours = opts.resolved(DEFAULTS)
    collapses = ((hours * 0.25, hours * 0.25 + 0.5), (hours * 0.6, hours * 0.6 + 0.5))
    groups = [Group("plant", devices, loss=0.05, latency_s=0.2, jitter_s=0.1,
                    bandwidth_bps=96_000, link_retries=1, outages_h=collapses)]
    spec = DeviceSpec(config={"retry": {"batch_max_bytes": 64 * 1024}})

    def gens(dev: str, clock, n: int):  # type: ignore[no-untyped-def]
        return [IndustrialGen(device_id=dev, clock=clock, seed=opts.seed * 1000 + n,
                              event_every_s=1200, event_s=60, burst_hz=100, batch_s=10)]

    # the cloud grants the whole fleet 0.5 batches/s (burst 4)
    fleet = Fleet(name=NAME, groups=groups, gens=gens, spec=spec, seed=opts.seed,
                  limiter=(0.5, 4.0), root=opts.root, memory=opts.memory,
                  progress=opts.progress, sample_s=120)
    try:
        rep = await fleet.run(hours, drain_hours=12)
    finally:
        fleet.close()
    rep.extra["machine_events"] = sum(len(g.events) for d in fleet.devices
                                      for g in d.generators if isinstance(g, IndustrialGen))
    rep.extra["cloud_throttled"] = fleet.cloud.limiter.throttled if fleet.cloud.limiter else 0
    return rep


def check(rep: Report) -> list[str]:
    bad = base_checks(rep)
    lag = rep.lag_p99_by_priority_s
    if "critical" in lag and "low" in lag and lag["critical"] > lag["low"]:
        bad.append(f"critical p99 lag {lag['critical']} s > low {lag['low']} s")
    if not rep.batches_throttled:
        bad.append("the cloud never throttled: the scenario did not exercise throttling")
    return bad
