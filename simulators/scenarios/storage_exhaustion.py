"""``storage-exhaustion``: a device stays offline until its disk fills. The disk is 768 KiB
for the whole state directory (database, WAL, sidecars, ballast: see
:class:`simulators.device.StorageQuota`), smaller than the configured 4 MiB byte budget,
so the disk, not the budget, is what fills: the agent sees it as ``statvfs`` would show
such a disk, the database cannot outgrow it (SQLite ``max_page_count``), and the agent
evicts by its documented policy: lowest priority first, oldest first, critical last,
every eviction counted and named by a gap record. The state directory's peak is checked
against the disk. When the link returns, what was kept is delivered, and the gap records
reach the cloud: its completeness ledger names every sequence number not stored."""

from __future__ import annotations

from collections import Counter
from typing import Any

from simulators.fleet import DeviceSpec, Fleet, Group
from simulators.report import Report
from simulators.scenarios import Options, base_checks
from simulators.sensors import WeatherGen

NAME = "storage-exhaustion"
SUMMARY = "offline until the disk (768 KiB for all state files) fills; eviction by priority"
DEFAULTS = {"devices": 1, "hours": 24}
SHORT = {"devices": 1, "hours": 2}  # the disk fills after about 1.5 h of 40 sensors
QUOTA = 768 * 1024
BUDGET = 4 * 1024 * 1024


async def run(opts: Options) -> Report:
    devices, hours = opts.resolved(DEFAULTS)
    groups = [Group("remote", devices, loss=0.0, latency_s=0.2, outages_h=((0.0, hours),))]
    spec = DeviceSpec(quota_bytes=QUOTA, config={
        "buffer": {"budget_bytes": BUDGET},
        "priorities": [{"match": "temperature*", "priority": "high"}]})

    def gens(dev: str, clock, n: int):  # type: ignore[no-untyped-def]
        return [WeatherGen(device_id=dev, clock=clock, seed=opts.seed * 1000 + n,
                           sensors=40, interval_s=1.0, batch_s=60.0, alarm_every_s=600,
                           low=("wind", "solar", "rain"))]

    fleet = Fleet(name=NAME, groups=groups, gens=gens, spec=spec, seed=opts.seed,
                  root=opts.root, memory=opts.memory, progress=opts.progress, sample_s=300)
    ledger: Counter[str] = Counter()

    async def inspect(f: Fleet) -> None:  # the cloud's completeness ledger
        for d in f.devices:
            for st in await f.cloud.store.completeness(d.id):
                ledger.update({"issued": st.max_seq - st.seq_base + 1, "stored": st.stored,
                               "unexplained": st.unexplained})
                ledger.update({f"gaps:{k}": v for k, v in st.gaps.items()})

    try:
        rep = await fleet.run(hours, drain_hours=6, inspect=inspect)
    finally:
        fleet.close()
    completeness: dict[str, Any] = dict(ledger)
    rep.extra["completeness"] = completeness
    rep.extra["disk_bytes"] = QUOTA
    rep.extra["budget_bytes"] = BUDGET
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
        bad.append("the disk never filled (no disk_full eviction)")
    led = rep.extra.get("completeness", {})
    if led.get("unexplained", 0):
        bad.append(f"{led['unexplained']} sequence numbers neither stored in the cloud nor "
                   "named by a gap record")
    if led.get("gaps:evicted", 0) != sum(ev.values()):
        bad.append(f"gap records name {led.get('gaps:evicted', 0)} evicted readings, the "
                   f"agent counted {sum(ev.values())}")
    disk = int(rep.extra.get("disk_bytes", QUOTA))
    if rep.peak_state_dir_bytes > disk:
        bad.append(f"the state directory reached {rep.peak_state_dir_bytes} B, over the "
                   f"{disk} B disk")
    return bad
