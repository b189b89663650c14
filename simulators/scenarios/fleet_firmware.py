"""``fleet-firmware``: a firmware rollout across a global fleet in three regions with
different connectivity.

Control plane: the real rollout engine of :mod:`cloud.fleet` in its dry-run simulation
(``cloud.fleet.dry_run``: canary, growing waves, health gates, offline devices, timeouts)
for 10,000 devices per region, region by region. Driving the coordinator over MQTT job
topics for every simulated device would cost more than it shows here, so the fleet's
wave schedule comes from the dry run.

Data plane: the in-process devices keep producing and uploading while they are updated:
each one restarts (graceful stop, new agent with the new firmware's config: a different
buffer codec) at the time the dry run schedules its region's update. The report shows
that no reading is lost or stored twice across the updates."""

from __future__ import annotations

from typing import Any

import msgspec

from cloud.fleet import FleetModel, dry_run, parse_spec
from cloud.fleet.sim import summary
from simulators.fleet import DeviceSpec, Fleet, Group
from simulators.report import Report
from simulators.scenarios import Options, base_checks
from simulators.sensors import WeatherGen

NAME = "fleet-firmware"
SUMMARY = "rollout in waves across 3 regions (coordinator dry run) while devices upload"
DEFAULTS = {"devices": 12, "hours": 12}
SHORT = {"devices": 6, "hours": 4}
REGION_FLEET = 10_000
# name, loss, latency, link outages (fraction of the run), online fraction, update max s
REGIONS: list[tuple[str, float, float, tuple[tuple[float, float], ...], float, float]] = [
    ("eu", 0.005, 0.04, (), 0.98, 120.0),
    ("americas", 0.02, 0.09, (), 0.92, 300.0),
    ("apac", 0.05, 0.25, ((0.55, 0.65),), 0.75, 900.0),
]
SPEC = {"rollout_id": "fw-2.1", "plan": {"canary": 50, "growth": 3.0, "max_wave": 3000},
        "gate": {"min_executed": 20, "success_threshold": 0.9},
        "offline_wait_s": 7200, "device_timeout_s": 3600}


async def run(opts: Options) -> Report:
    devices, hours = opts.resolved(DEFAULTS)
    plans: dict[str, dict[str, Any]] = {}
    for i, (name, _loss, _lat, _out, online, upd) in enumerate(REGIONS):
        res = summary(dry_run(parse_spec({**SPEC, "rollout_id": f"fw-2.1-{name}"}),
                              FleetModel(devices=REGION_FLEET, online_fraction=online,
                                         update_max_s=upd, seed=opts.seed + i)))
        res.pop("transitions", None)
        plans[name] = res
    per = max(1, devices // len(REGIONS))
    groups: list[Group] = []
    left = devices
    for i, (name, loss, lat, out, _on, _upd) in enumerate(REGIONS):
        n = left if i == len(REGIONS) - 1 else min(per, left)
        if n > 0:
            groups.append(Group(name, n, loss=loss, latency_s=lat,
                                outages_h=tuple((a * hours, b * hours) for a, b in out)))
        left -= n

    def gens(dev: str, clock: Any, n: int):  # type: ignore[no-untyped-def]
        return [WeatherGen(device_id=dev, clock=clock, seed=opts.seed * 1000 + n, sensors=6,
                           interval_s=2.0, batch_s=60.0, alarm_every_s=1800)]

    fleet = Fleet(name=NAME, groups=groups, gens=gens,
                  spec=DeviceSpec(config={"buffer": {"codec": "tsz-zstd"}}), seed=opts.seed,
                  root=opts.root, memory=opts.memory, progress=opts.progress, sample_s=300)
    # regions roll out one after another in the middle 70 % of the run; within a region
    # devices update in the order and at the pace of the dry run's completion time
    span = hours * 0.7
    total_min = sum(p["simulated_minutes_to_complete"] for p in plans.values()) or 1.0
    scale = min(1.0, span * 60 / total_min)
    t0 = hours * 0.15
    updated: list[str] = []

    def updater(dev_index: int):  # type: ignore[no-untyped-def]
        async def update(f: Fleet) -> None:
            d = f.devices[dev_index]
            await d.stop()
            buf = msgspec.structs.replace(d.config.buffer, codec="columnar-zstd")
            d.config = msgspec.structs.replace(d.config, buffer=buf)
            await d.start()
            updated.append(d.id)
        return update

    for g in groups:
        idx = [i for i, d in enumerate(fleet_devices(fleet, groups)) if d == g.name]
        minutes = plans[g.name]["simulated_minutes_to_complete"] * scale
        for k, i in enumerate(idx):
            fleet.at(t0 + minutes / 60 * (k + 1) / len(idx), updater(i))
        t0 += minutes / 60
    try:
        rep = await fleet.run(hours, drain_hours=6)
    finally:
        fleet.close()
    rep.extra["region_fleet_size"] = REGION_FLEET
    rep.extra["dry_run"] = {
        k: {"status": v["status"], "minutes": v["simulated_minutes_to_complete"],
            "succeeded": v["succeeded"], "waves": v["waves"],
            "peak_notify_per_min": v["peak_notifications_per_minute"]}
        for k, v in plans.items()}
    rep.extra["devices_updated_in_process"] = len(updated)
    return rep


def fleet_devices(fleet: Fleet, groups: list[Group]) -> list[str]:
    """Group name of each device, in the order the fleet builds them."""
    return [g.name for g in groups for _ in range(g.devices)]


def check(rep: Report) -> list[str]:
    bad = base_checks(rep)
    if rep.extra.get("devices_updated_in_process") != rep.devices:
        bad.append(f"only {rep.extra.get('devices_updated_in_process')} of {rep.devices} "
                   "devices were updated")
    for region, r in rep.extra.get("dry_run", {}).items():
        if r["status"] != "completed":
            bad.append(f"rollout in {region} did not complete: {r['status']}")
    return bad
