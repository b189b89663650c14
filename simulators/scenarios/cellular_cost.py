"""``cellular-cost``: the same station data sent over a metered cellular link three ways:
compressed with a general codec (columnar + LZ4), with the time-series codec (the
default, TSZ + zstd), and aggregated at the edge (5-minute min/max/avg; alarms raw).
A naive client's cost (SenML JSON, one record per reading) is computed from the same
readings as a baseline. Cost uses a per-MB price with a per-session rounding increment,
as cellular IoT plans bill."""

from __future__ import annotations

from typing import Any

from pymigrate.senml import to_senml_json
from simulators.fleet import DeviceSpec, Fleet, Group
from simulators.report import Report
from simulators.scenarios import Options, base_checks
from simulators.sensors import WeatherGen

NAME = "cellular-cost"
SUMMARY = "same data raw (SenML JSON) vs compressed vs aggregated: bytes and cellular cost"
DEFAULTS = {"devices": 1, "hours": 24}
SHORT = {"devices": 1, "hours": 1.5}
PRICE_PER_MB = 0.25  # USD per 10^6 bytes
BILLING_INCREMENT = 1024  # every session is rounded up to this many bytes
MTU, HEADER = 1200, 40

VARIANTS: dict[str, dict[str, Any]] = {
    "lz4": {"buffer": {"codec": "columnar-lz4"}},
    "tsz-zstd": {"buffer": {"codec": "tsz-zstd"}},
    "aggregated-5min": {
        "buffer": {"codec": "tsz-zstd"},
        "aggregation": {"rules": [
            {"name": "alarms", "match": "alarm*", "window": {"type": "raw"}},
            {"name": "agg5m", "match": "*", "window": {"type": "tumbling", "size_s": 300},
             "functions": ["min", "max", "avg"]}]}},
}


def billed(attempt_bytes: int, sessions: int) -> float:
    """Cost of ``attempt_bytes`` over ``sessions`` sends, each rounded up."""
    rounded = attempt_bytes + sessions * BILLING_INCREMENT / 2  # mean rounding loss
    return rounded / 1e6 * PRICE_PER_MB


async def run(opts: Options) -> Report:
    devices, hours = opts.resolved(DEFAULTS)
    variants: dict[str, dict[str, Any]] = {}
    main: Report | None = None
    raw_bytes: list[int] = []
    for name, cfg in VARIANTS.items():
        groups = [Group("cell", devices, loss=0.01, latency_s=0.15, jitter_s=0.05,
                        bandwidth_bps=200_000)]
        spec = DeviceSpec(config={**cfg, "retry": {"profile": "metered"}})

        def gens(dev: str, clock: Any, n: int):  # type: ignore[no-untyped-def]
            return [WeatherGen(device_id=dev, clock=clock, seed=opts.seed * 1000 + n,
                               sensors=10, interval_s=1.0, batch_s=60.0,
                               alarm_every_s=3600)]

        async def inspect(f: Fleet, name: str = name) -> None:
            if name != "lz4":
                return
            for d in f.devices:  # the naive client's payload for the same readings
                rs = await f.cloud.store.query(d.id)
                for i in range(0, len(rs), 600):  # one message a minute (600 readings)
                    body = len(to_senml_json(rs[i:i + 600], base_name=f"{d.id}/"))
                    raw_bytes.append(body + -(-body // MTU) * HEADER)

        fleet = Fleet(name=NAME, groups=groups, gens=gens, spec=spec, seed=opts.seed,
                      root=None if opts.root is None else opts.root / name,
                      memory=opts.memory, progress=opts.progress, sample_s=300)
        try:
            rep = await fleet.run(hours, drain_hours=2, inspect=inspect)
        finally:
            fleet.close()
        days = max(hours / 24.0, 1e-9)
        variants[name] = {
            "wire_bytes": rep.wire_bytes, "sends": rep.attempts,
            "readings_stored": rep.delivered,
            "bytes_per_produced_reading": round(rep.wire_bytes / max(rep.produced, 1), 3),
            "usd_per_device_month": round(billed(rep.wire_bytes, rep.attempts)
                                          / devices / days * 30, 4),
            "lost": rep.lost, "all_delivered": rep.all_delivered,
            "problems": base_checks(rep)}
        if name == "tsz-zstd":
            main = rep
    assert main is not None
    days = max(hours / 24.0, 1e-9)
    raw = sum(raw_bytes)
    variants["raw-senml-json (computed)"] = {
        "wire_bytes": raw, "sends": len(raw_bytes),
        "bytes_per_produced_reading": round(raw / max(main.produced, 1), 3),
        "usd_per_device_month": round(billed(raw, len(raw_bytes)) / devices / days * 30, 4)}
    main.extra["price"] = f"{PRICE_PER_MB} USD/MB, sessions rounded up to {BILLING_INCREMENT} B"
    main.extra["variants"] = variants
    return main


def check(rep: Report) -> list[str]:
    bad = base_checks(rep)
    v = rep.extra.get("variants", {})
    for name, d in v.items():
        for p in d.get("problems", []):
            bad.append(f"{name}: {p}")
    order = ["raw-senml-json (computed)", "lz4", "tsz-zstd", "aggregated-5min"]
    sizes = [v[k]["wire_bytes"] for k in order if k in v]
    if sizes != sorted(sizes, reverse=True):
        bad.append(f"bytes do not shrink raw > lz4 > tsz > aggregated: {sizes}")
    return bad
