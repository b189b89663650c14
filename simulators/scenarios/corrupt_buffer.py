"""``corrupt-buffer``: while devices are offline, their buffer files are damaged on disk
(bit flips inside stored chunks, as flash wear or a torn write would leave them) between
two agent runs. On restart the agent opens the file, verifies every chunk's checksum when
it reads it, quarantines the damaged ones (counted, kept for inspection) and delivers
everything else. Loss is exactly the quarantined readings, nothing more."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from simulators.fleet import DeviceSpec, Fleet, Group
from simulators.report import Report
from simulators.scenarios import Options, base_checks
from simulators.sensors import WeatherGen

NAME = "corrupt-buffer"
SUMMARY = "bit flips in stored chunks between runs: quarantined, the rest delivered"
DEFAULTS = {"devices": 3, "hours": 12}
SHORT = {"devices": 2, "hours": 2}
CHUNKS_PER_DEVICE = 3


def corrupt_chunks(path: Path, count: int) -> int:
    """Flip one byte inside the payload of ``count`` stored chunks, in the file itself
    (not through SQLite). Returns the readings in the damaged chunks."""
    con = sqlite3.connect(path)
    try:
        rows = con.execute("SELECT id, count, payload FROM chunks ORDER BY id").fetchall()
    finally:
        con.close()
    data = bytearray(path.read_bytes())
    step = max(1, len(rows) // (count + 1))
    damaged = 0
    for _cid, n, payload in rows[step::step][:count]:
        blob = bytes(payload)
        pos = data.find(blob) if len(blob) >= 16 else -1
        if pos < 0:
            continue  # an overflow page split the payload: pick another
        data[pos + len(blob) // 2] ^= 0x5A
        damaged += int(n)
    path.write_bytes(bytes(data))
    return damaged


async def run(opts: Options) -> Report:
    devices, hours = opts.resolved(DEFAULTS)
    offline = (0.0, hours * 0.75)
    groups = [Group("site", devices, loss=0.01, latency_s=0.1, outages_h=(offline,))]

    def gens(dev: str, clock: Any, n: int):  # type: ignore[no-untyped-def]
        return [WeatherGen(device_id=dev, clock=clock, seed=opts.seed * 1000 + n,
                           sensors=10, interval_s=2.0, batch_s=60.0, alarm_every_s=1800)]

    fleet = Fleet(name=NAME, groups=groups, gens=gens, spec=DeviceSpec(), seed=opts.seed,
                  root=opts.root, memory=opts.memory, progress=opts.progress, sample_s=300)
    damaged: dict[str, int] = {}

    async def damage(f: Fleet) -> None:
        for d in f.devices:
            await d.stop()
            damaged[d.id] = corrupt_chunks(d.buffer_path(), CHUNKS_PER_DEVICE)
            await d.start()

    fleet.at(hours / 2, damage)
    try:
        rep = await fleet.run(hours, drain_hours=6)
    finally:
        fleet.close()
    rep.extra["damaged_readings"] = sum(damaged.values())
    rep.extra["restarts"] = sum(d.incarnations - 1 for d in fleet.devices)
    return rep


def check(rep: Report) -> list[str]:
    bad = base_checks(rep)
    if rep.quarantined != rep.extra.get("damaged_readings"):
        bad.append(f"quarantined {rep.quarantined} readings, damaged "
                   f"{rep.extra.get('damaged_readings')}")
    if not rep.quarantined:
        bad.append("no corruption detected")
    return bad
