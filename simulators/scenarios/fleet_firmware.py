"""``fleet-firmware``: a firmware rollout across a global fleet in three regions with
different connectivity.

Control plane: the real rollout engine of :mod:`cloud.fleet` in its dry-run simulation
(``cloud.fleet.dry_run``: canary, growing waves, health gates, offline devices, timeouts)
for 10,000 devices per region, region by region. Driving the coordinator over MQTT job
topics for every simulated device would cost more than it shows here, so the fleet's
wave schedule comes from the dry run.

Device side: each in-process device runs a real firmware job (``agent.firmware``) at the
time the dry run schedules its region's update: the signed image comes from an HTTP
artifact server on loopback (``simulators.artifacts``; the first download is cut halfway
and must resume with Range), is checked (size, sha256, the release key's Ed25519
signature) and installed by the shipped A/B hook (configs/fleet/firmware/ab-slot.sh, one
slot pair per device); the install restarts the device (graceful stop, new agent with the
new firmware's config: a different buffer codec), then the health hook runs. One device
gets a tampered image (refused, never installed, no restart), one a version whose health
check fails (rolled back by the hook, restarted on the old firmware). The data plane keeps
producing and uploading throughout; the report shows no reading lost or stored twice.
The firmware path runs in real time beside the virtual clock (HTTP and hook processes
are real); only the health delay and retry backoff sleep on virtual time."""

from __future__ import annotations

import collections
import hashlib
import os
from typing import Any

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.firmware import FirmwareError, FirmwareUpdater
from cloud.fleet import FleetModel, dry_run, parse_spec
from cloud.fleet.sim import summary
from simulators.artifacts import AB_HOOK, ArtifactServer
from simulators.fleet import DeviceSpec, Fleet, Group
from simulators.report import Report
from simulators.scenarios import Options, base_checks
from simulators.sensors import WeatherGen
from transports.jobs_protocol import FirmwareArtifact
from transports.jobs_security import sign

NAME = "fleet-firmware"
SUMMARY = "rollout in waves across 3 regions (coordinator dry run) while devices upload"
DEFAULTS = {"devices": 12, "hours": 12}
SHORT = {"devices": 6, "hours": 2}
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
IMAGE_BYTES = 256 * 1024  # firmware image size served to each device


def _artifact(key: Ed25519PrivateKey, url: str, body: bytes, version: str) -> dict[str, Any]:
    art = FirmwareArtifact(version, url, len(body), hashlib.sha256(body).hexdigest())
    doc: dict[str, Any] = msgspec.to_builtins(sign(art, key))
    return doc


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
    outcomes: collections.Counter[str] = collections.Counter()
    counters: collections.Counter[str] = collections.Counter()
    if not AB_HOOK.exists():
        raise FileNotFoundError(f"{AB_HOOK}: the fleet-firmware scenario runs the shipped A/B"
                                " hook from a source checkout")
    release = Ed25519PrivateKey.generate()
    good, bad_health = os.urandom(IMAGE_BYTES), os.urandom(IMAGE_BYTES)
    tampered = bytearray(good)
    tampered[IMAGE_BYTES // 3] ^= 0xFF
    srv = await ArtifactServer({"/fw-2.1.bin": good, "/fw-2.2.bin": bad_health,
                                "/fw-2.1-mirror.bin": bytes(tampered)}, drop_once=True).start()
    images = {"good": _artifact(release, srv.url("/fw-2.1.bin"), good, "2.1"),
              "bad_health": _artifact(release, srv.url("/fw-2.2.bin"), bad_health, "2.2"),
              # the tampered mirror serves other bytes under the signed 2.1 manifest
              "tampered": _artifact(release, srv.url("/fw-2.1-mirror.bin"), good, "2.1")}
    n_dev = sum(g.devices for g in groups)
    cases = {1 % n_dev: "tampered", 2 % n_dev: "bad_health"} if n_dev >= 3 else {}

    async def restart(d: Any, codec: str) -> None:
        await d.stop()
        buf = msgspec.structs.replace(d.config.buffer, codec=codec)
        d.config = msgspec.structs.replace(d.config, buffer=buf)
        await d.start()

    def updater(dev_index: int):  # type: ignore[no-untyped-def]
        async def update(f: Fleet) -> None:
            d = f.devices[dev_index]
            case = cases.get(dev_index, "good")
            env = ["env", f"FW_ROOT={f.root / 'slots' / d.id}",
                   *(["FW_HEALTH_CMD=exit 3"] if case == "bad_health" else [])]
            old_codec = d.config.buffer.codec
            fw = FirmwareUpdater(f.root / "firmware" / d.id, verify_key=release.public_key(),
                                 install_cmd=[*env, str(AB_HOOK), "install"],
                                 health_cmd=[*env, str(AB_HOOK), "health"],
                                 rollback_cmd=[*env, str(AB_HOOK), "rollback"],
                                 clock=f.clock, health_delay_s=60, retry_backoff_s=5,
                                 cmd_timeout_s=30)

            async def report(phase: str, done: int, total: int) -> None:
                if phase == "health":  # installed: the hook restarts into the new slot
                    await restart(d, "columnar-zstd")

            try:
                await fw.apply(f"fw-2.1-{d.id}", images[case], report)
                updated.append(d.id)
                outcomes["updated"] += 1
            except FirmwareError as exc:
                outcomes[exc.reason] += 1
                if exc.rolled_back:  # the hook switched back: restart on the old firmware
                    await restart(d, old_codec)
            counters.update(fw.counters)
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
        await srv.stop()
    rep.extra.update({
        "firmware_updated": counters["updated"],
        "signature_verified": counters["signature_verified"],
        "downloads_resumed": counters["downloads_resumed"],
        "tampered_refused": outcomes["sha256_mismatch"],
        "rolled_back": counters["rolled_back"],
        "lost": rep.lost,
        "firmware_outcomes": dict(outcomes),
        "firmware_cases": {fleet.devices[i].id: c for i, c in cases.items()},
    })
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
    x = rep.extra
    special = len(x.get("firmware_cases", {}))
    if x.get("firmware_updated") != rep.devices - special:
        bad.append(f"firmware updated on {x.get('firmware_updated')} of "
                   f"{rep.devices - special} devices with a good image")
    if special and (x.get("tampered_refused", 0) < 1 or x.get("rolled_back", 0) < 1):
        bad.append(f"expected a tampered image refused and a rollback: "
                   f"{x.get('firmware_outcomes')}")
    if x.get("downloads_resumed", 0) < 1:
        bad.append("no firmware download was resumed after the cut connection")
    if x.get("signature_verified") != x.get("firmware_updated", 0) + x.get("rolled_back", 0):
        bad.append("an image was installed without a verified signature")
    for region, r in rep.extra.get("dry_run", {}).items():
        if r["status"] != "completed":
            bad.append(f"rollout in {region} did not complete: {r['status']}")
    return bad
