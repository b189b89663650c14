"""Fleet rollout benchmark on virtual time: ``python -m bench fleet --devices N [N ...]``.

For each N: a rollout over N simulated devices (update 1-5 min, 2 % failing, 5 %
offline of which half come back within the hour) through the real coordinator engine,
then a second run with 30 % failing devices that must stop at the first gate and roll
back. Memory is measured with tracemalloc: the peak while the coordinator is built and
runs, minus the simulated devices' own model arrays (which a real coordinator does not
hold); the simulator's event heap and in-flight messages are included.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from typing import Any

from bench.common import emit
from cloud.fleet.sim import FleetModel, Simulation
from cloud.fleet.spec import Gate, RolloutSpec, WavePlan


def spec_for(args: argparse.Namespace, rid: str) -> RolloutSpec:
    """The rollout spec the benchmark runs."""
    return RolloutSpec(
        rollout_id=rid, plan=WavePlan(canary_pct=args.canary_pct, growth=args.growth),
        max_in_flight=args.max_in_flight, max_notifications_per_min=args.rate,
        device_timeout_s=420.0, max_retries=1, soak_s=args.soak_s, offline_wait_s=900.0,
        gate=Gate(success_threshold=0.95, min_executed=20, on_fail="abort",
                  advance_fraction=args.advance_fraction))


def run_one(n: int, failure: float, args: argparse.Namespace, rid: str) -> dict[str, Any]:
    """Simulate one rollout; returns its figures."""
    model = FleetModel(devices=n, online_fraction=1.0 - args.offline, failure_rate=failure,
                       update_min_s=60.0, update_max_s=300.0, seed=args.seed)
    tracemalloc.start()
    t0 = time.perf_counter()
    sim = Simulation(model)
    model_bytes = sim.behaviour.__sizeof__() + sim.duration.__sizeof__()
    res = sim.run(spec_for(args, rid))
    wall = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    coord = peak - model_bytes
    return {
        "status": res.status, "reason": res.reason,
        "simulated_minutes_to_complete": res.simulated_minutes_to_complete,
        "simulated_minutes_to_last_update": res.simulated_minutes_to_last_update,
        "wall_seconds": round(wall, 2),
        "coordinator_peak_memory_bytes": coord,
        "bytes_per_device": round(coord / n, 1),
        "peak_notifications_per_minute": res.peak_notifications_per_minute,
        "peak_catchup_ingest_bytes_per_s": res.peak_ingest_bytes_per_s,
        "states": res.states, "wave_sizes": res.wave_sizes, "gates": res.gate_verdicts,
        "rollback_waves": res.rollback_waves, "transitions": res.transitions,
        "notifications": res.notifications,
    }


def main(argv: list[str]) -> int:
    """Entry point for ``python -m bench fleet``."""
    p = argparse.ArgumentParser(prog="python -m bench fleet")
    p.add_argument("--devices", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--rate", type=int, default=1000, help="max notifications per minute")
    p.add_argument("--max-in-flight", type=int, default=100_000)
    p.add_argument("--canary-pct", type=float, default=1.0)
    p.add_argument("--growth", type=float, default=4.0)
    p.add_argument("--soak-s", type=float, default=120.0)
    p.add_argument("--failure", type=float, default=0.02)
    p.add_argument("--rollback-failure", type=float, default=0.30)
    p.add_argument("--offline", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--advance-fraction", type=float, default=1.0,
                   help="gate: advance once this fraction of a wave executed (1.0: certain)")
    from bench.fleet_aws import add_args, run_aws

    add_args(p)
    args = p.parse_args(argv)
    results: dict[str, Any] = {}
    for n in args.devices:
        main_run = run_one(n, args.failure, args, f"bench-{n}")
        rb = run_one(n, args.rollback_failure, args, f"bench-{n}-rb")
        main_run["rollback_exercised"] = (rb["status"] == "rolled_back"
                                          and rb["states"].get("rolled_back", 0) > 0)
        main_run["rollback_run"] = {k: rb[k] for k in (
            "status", "reason", "simulated_minutes_to_complete", "wall_seconds", "states",
            "gates", "rollback_waves", "peak_notifications_per_minute")}
        main_run["min_minutes_at_rate_cap"] = round(n / args.rate, 1)
        if args.backend == "aws-iot-jobs":  # the same spec through AWS IoT Jobs (moto)
            main_run["aws_iot_jobs"] = run_aws(n, args.failure, spec_for(args, f"aws-{n}"),
                                               args.seed)
        results[str(n)] = main_run
    emit("fleet", vars(args), results)
    return 0
