"""``python -m bench fleet-failover``: kill the active coordinator mid-wave, repeatedly.

Real ``pymigrate fleet serve`` replicas (``--replicas``, default 2) on PostgreSQL (a fresh
schema, dropped afterwards) and Mosquitto, with ``--devices`` simulated device clients
(default 1,000, on a few MQTT connections; see ``bench/_fleet_harness.py``). During one
signed rollout the active replica (the lease holder) is killed with SIGKILL ``--kills``
times (default 3) at evenly spaced points of the rollout; each killed replica is started
again so a standby is always there. Reported:

* ``max_failover_s``: SIGKILL to the standby holding the lease (a new fencing token);
* ``transitions_lost``: broken transition chains + device states that disagree with the
  log + notifications a device received without a durable transition;
* ``duplicate_notifications``: deliveries beyond the first of the same
  (device, job, attempt, op), counted at the devices;
* ``rollout_completed`` and the time it took.

Needs PostgreSQL (``--pg``, default the test database) and Mosquitto (``--broker``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from bench._fleet_harness import FakeFleet, ServeProcess, audit, wait_for
from cloud.fleet.cli import main as fleet_main
from cloud.fleet.states import DeviceState
from cloud.fleet.store import open_store
from cloud.fleet.store_pg import PostgresFleetStore
from transports.jobs_security import generate_keypair, load_public_key


async def _lease(store: PostgresFleetStore) -> tuple[str, int] | None:
    async with store.pool.acquire() as con:
        row = await con.fetchrow(f"SELECT holder, token FROM {store.s}.lease")
    return None if row is None else (str(row[0]), int(row[1]))


def _cli(argv: list[str]) -> int:
    with contextlib.redirect_stdout(io.StringIO()):  # keep this benchmark's stdout JSON
        return fleet_main(argv)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    host, _, port_s = args.broker.rpartition(":")
    port = int(port_s)
    prefix = f"bench-fo-{uuid.uuid4().hex[:6]}"
    url = f"{args.pg}?fleet_schema=bench_fo_{uuid.uuid4().hex[:8]}"
    tmp = Path(tempfile.mkdtemp(prefix="pm-fleet-failover-"))
    job_key, job_pub = generate_keypair(tmp, "jobs")
    op_key, op_pub = generate_keypair(tmp, "operator")
    serve_args = ["--store", url, "--broker", args.broker, "--prefix", prefix,
                  "--signing-key", str(job_key), "--control-key", str(op_pub)]
    store = open_store(url)
    assert isinstance(store, PostgresFleetStore)
    await store.open()
    spawned = 0

    def replica() -> ServeProcess:
        nonlocal spawned
        spawned += 1
        return ServeProcess(serve_args, tmp / f"serve{spawned}.log")

    replicas = [replica() for _ in range(args.replicas)]
    devices = [f"fo{i:05d}" for i in range(args.devices)]
    fleet = FakeFleet(host, port, prefix, devices, verify_key=load_public_key(job_pub),
                      update_s=(0.5, 2.0))
    failovers: list[float] = []
    resumed: list[float] = []
    kill_ms: list[int] = []
    t0 = time.perf_counter()
    try:
        for r in replicas:
            await r.start()
        if not await wait_for(_lease_taken(store), 30):
            raise RuntimeError("no replica became active: " + replicas[0].log()[-2000:])
        (tmp / "devices.json").write_text(json.dumps([{"device_id": d} for d in devices]))
        rc = await asyncio.to_thread(_cli, ["add-devices", "--store", url, "--file",
                                                  str(tmp / "devices.json")])
        assert rc == 0
        await fleet.start()
        spec = tmp / "spec.json"
        spec.write_text(json.dumps({
            "rollout_id": "fo", "document": {"content": "v = 2\n"}, "soak_s": 0.5,
            "plan": {"canary": max(10, args.devices // 50), "growth": 2},
            "gate": {"min_executed": 10, "advance_fraction": 0.5},
            "max_notifications_per_min": args.rate, "max_in_flight": args.devices,
            "device_timeout_s": 15, "max_retries": 3}))
        rc = await asyncio.to_thread(_cli, [
            "create-rollout", "--store", url, "--spec", str(spec), "--broker", args.broker,
            "--prefix", prefix, "--signing-key", str(op_key)])
        assert rc == 0
        started = time.perf_counter()
        for k in range(args.kills):
            target = args.devices * (k + 1) // (args.kills + 1)
            if not await wait_for(lambda t=target: fleet.notified >= t, 120):
                break
            held = await _lease(store)
            assert held is not None
            active = next(r for r in replicas if r.running and held[0].endswith(f":{r.pid}"))
            await active.kill9()
            killed = time.perf_counter()
            kill_ms.append(int(time.time() * 1000))

            async def moved(token: int = held[1]) -> bool:
                now = await _lease(store)
                return now is not None and now[1] > token

            if not await wait_for(moved, 60, step=0.02):
                raise RuntimeError("no standby took over within 60 s")
            failovers.append(round(time.perf_counter() - killed, 3))
            heard = fleet.notified
            replicas.remove(active)
            fresh = replica()  # the killed replica comes back as a standby
            await fresh.start()
            replicas.append(fresh)
            # notifications flow again: the new active one loaded the state and resumed
            if await wait_for(lambda h=heard: fleet.notified > h, 30, step=0.02):
                resumed.append(round(time.perf_counter() - killed, 3))

        async def completed() -> bool:
            recs = {r.rollout_id: r for r in await store.load_rollouts()}
            return "fo" in recs and recs["fo"].status == "completed"

        done = await wait_for(completed, args.timeout)
        rollout_s = time.perf_counter() - started
        counts = await store.state_counts("fo")
        lost = await audit(store, "fo", fleet)
        names = [x.name.lower() for x in DeviceState]
        kinds = Counter(f"{names[t.src]}->{names[t.dst]}"
                        for t in await store.load_transitions("fo"))
        return {
            "benchmark": "fleet-failover", "replicas": args.replicas,
            "devices": args.devices, "notifications_per_min": args.rate,
            "coordinator_kills": len(failovers),
            "transitions_lost": lost["broken_chains"] + lost["state_mismatches"]
            + lost["notified_without_durable_transition"],
            "duplicate_notifications": fleet.duplicate_notifications,
            "applied_twice": sum(1 for n in fleet.applied.values() if n > 1),
            "bad_signatures": fleet.bad_signatures,
            "max_failover_s": max(failovers, default=0.0), "failovers_s": failovers,
            "resumed_sending_after_kill_s": resumed,
            **({"kill_ms": kill_ms} if args.keep else {}),
            "rollout_completed": done, "rollout_s": round(rollout_s, 1),
            "succeeded": counts.get(DeviceState.SUCCEEDED, 0),
            "notifications_received": fleet.notified,
            "transitions_logged": lost["transitions_logged"], "audit": lost,
            "transitions_by_kind": dict(kinds.most_common()),
            "wall_s": round(time.perf_counter() - t0, 1),
            **({"kept": {"store": url, "logs": str(tmp)}} if args.keep else {}),
        }
    finally:
        for r in replicas:
            if r.running:
                await r.stop()
        await fleet.stop()
        if not args.keep:
            await store.drop_schema()
        await store.close()


def _lease_taken(store: PostgresFleetStore) -> Any:
    async def check() -> bool:
        return await _lease(store) is not None

    return check


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench fleet-failover", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=1000, help="simulated device clients")
    p.add_argument("--replicas", type=int, default=2, help="fleet serve replicas (>= 2)")
    p.add_argument("--kills", type=int, default=3, help="kill -9 of the active replica")
    p.add_argument("--rate", type=int, default=3000, help="max notifications per minute")
    p.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test",
                   help="PostgreSQL DSN (a fresh schema is created and dropped)")
    p.add_argument("--broker", default="127.0.0.1:1883", help="Mosquitto HOST:PORT")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds to wait for the rollout to complete")
    p.add_argument("--keep", action="store_true",
                   help="keep the schema and the replicas' logs (prints where)")
    args = p.parse_args(argv)
    if args.replicas < 2:
        p.error("argument --replicas: must be >= 2")
    out = asyncio.run(run(args))
    print(json.dumps(out, indent=2))
    ok = (out["rollout_completed"] and out["transitions_lost"] == 0
          and out["duplicate_notifications"] == 0 and out["max_failover_s"] < 30)
    return 0 if ok else 1
