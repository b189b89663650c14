"""The cloud side on a real cluster, with a broker node and an ingest replica killed:
``python -m bench cluster [--nodes 3] [--replicas 3] [--devices 20] [--sensors 10]
[--rate 5] [--duration 60] [--node-kill-at 15] [--replica-kill-at 30] [--restart-after 10]
[--stall-s 2]
[--dsn DSN] [--keep]``.

What runs (all on loopback, all started and torn down here):

- a RabbitMQ cluster of ``--nodes`` nodes from Debian's ``rabbitmq-server``
  (:mod:`bench._rabbit_cluster`), the ingest queue a quorum queue on every node;
- ``--replicas`` real ``pymigrate cloud`` processes, competing consumers on that queue,
  each with every node in ``[cloud.amqp] hosts``, storing into PostgreSQL (a fresh schema
  of ``--dsn``, dropped afterwards; plain tables);
- ``--devices`` agents speaking AMQP: the real agent (buffer, uploader, retry controller,
  AMQP uplink with the node list) in this process, one event loop, fed by a source that
  records what it produced (:mod:`bench._amqp_fleet`), ``--sensors`` readings every
  ``1/--rate`` s each;
- at ``--node-kill-at`` s the node leading the ingest queue is frozen (``SIGSTOP``) for
  ``--stall-s`` s, then killed (``kill -9`` of its process group); at
  ``--replica-kill-at`` s one ingest replica is frozen and killed the same way. The freeze
  makes each die holding work, as a hung machine would: publishes the node had not
  confirmed, deliveries the replica had taken (prefetch) and not acked. Each is started
  again ``--restart-after`` s later (0: never).

At ``--duration`` s the sources stop and every agent drains its buffer (graceful stop);
then the replicas stop (SIGTERM) and the audit reads the result two independent ways:

- **reading by reading** against the harness's own record: every produced reading
  (device, sensor, unique value, timestamp) must be stored exactly once; ``lost`` =
  produced and not stored, ``duplicated`` = stored copies beyond the first (of a reading
  or of a sequence number), ``foreign`` = stored readings nobody produced;
- the **completeness ledger** (``pymigrate cloud completeness --json`` on the replicas'
  config): every sequence number each agent issued stored or in a gap record;
  ``unexplained`` there plus ``foreign`` above is the ``unexplained`` reported. The
  ledger's stored count must equal the rows in the table and the readings produced.

``readings_per_s``: readings stored / wall time from the first agent start to the last
agent drained (the offered load is ``devices x sensors x rate``; the run is about
correctness under failures, not capacity: see ``python -m bench scaling``). CPU seconds
per replica (every incarnation, the killed one included), per RabbitMQ node, and of this
process (the agents and the harness) are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench._amqp_fleet import AmqpFleet, audit_rows
from bench._chaos_env import PY, ROOT, Proc, wait_until
from bench._rabbit_cluster import RabbitCluster, rabbitmq_missing
from bench.common import drop_pg_schema

DEFAULT_DSN = os.environ.get("PYMIGRATE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def _cpu_self() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class Replica:
    """One ``pymigrate cloud`` process and its log."""

    def __init__(self, index: int, config: Path, workdir: Path) -> None:
        self.name = f"r{index}"
        self.log = workdir / f"cloud-{self.name}.log"
        self.proc = Proc(["cloud", "--config", str(config)], self.log, cwd=workdir)
        self.kills = 0

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    async def start(self, limit_s: float = 60.0) -> None:
        seen = self.log_text().count("cloud ingest ready")
        self.proc.start()
        if not await wait_until(lambda: self.log_text().count("cloud ingest ready") > seen,
                                limit_s, step=0.2):
            raise RuntimeError(f"replica {self.name} did not start:\n{self.log_text()[-2000:]}")


def write_cloud_config(path: Path, *, hosts: list[str], dsn: str, schema: str,
                       run: str) -> None:
    host_list = ", ".join(f'"{h}"' for h in hosts)
    path.write_text(f"""
[log]
format = "json"
level = "info"

[cloud]
store = "postgres"
listeners = ["amqp"]
completeness_interval_s = 0

[cloud.postgres]
dsn = "{dsn}"
schema = "{schema}"
pool_max = 2
timescale = "off"

[cloud.amqp]
hosts = [{host_list}]
exchange = "cl{run}"
queue = "cl{run}.ingest"
queue_type = "quorum"
prefetch = 16
connect_timeout_s = 3.0
reconnect_max_s = 1.0
""")


def _stop_counts(log: str) -> tuple[int, int]:
    """(handled, redelivered) summed over the replica's cleanly stopped incarnations."""
    h = sum(int(m) for m in re.findall(r"AMQP ingest stopped: handled=(\d+)", log))
    r = sum(int(m) for m in re.findall(r"redelivered=(\d+)", log))
    return h, r


async def _leader(cluster: RabbitCluster, queue: str) -> int:
    """Index of the node leading ``queue`` (0 when it cannot be told)."""
    for i, node in enumerate(cluster.nodes):
        if not node.alive:
            continue
        try:
            out = await cluster.ctl(node, "list_queues", "-q", "name", "leader", timeout_s=30)
        except RuntimeError:
            continue
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == queue:
                names = [n.nodename for n in cluster.nodes]
                return names.index(parts[1]) if parts[1] in names else i
    return 0


async def _ledger(config: Path) -> dict[str, Any]:
    p = await asyncio.create_subprocess_exec(
        PY, "-m", "pymigrate.cli", "cloud", "completeness", "--json", "--config", str(config),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get(
            "PYTHONPATH", "")})
    out, err = await asyncio.wait_for(p.communicate(), 120)
    if p.returncode not in (0, 1):
        raise RuntimeError(f"completeness failed ({p.returncode}): {err.decode()[-1000:]}")
    data: dict[str, Any] = json.loads(out)
    return data


async def _rows(dsn: str, schema: str) -> list[tuple[str, str, float, int, int]]:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(f"SELECT device_id, sensor, value, ts_ms, seq FROM {schema}"
                                ".readings")
        return [(r[0], r[1], float(r[2]), int(r[3]), int(r[4])) for r in rows]
    finally:
        await conn.close()


async def _sample(dsn: str, schema: str, t0: float,
                  out: list[tuple[float, int]]) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        while True:
            try:
                n = await conn.fetchval(f"SELECT count(*) FROM {schema}.readings")
            except asyncpg.PostgresError:
                n = 0  # the replicas have not created the table yet
            out.append((round(time.monotonic() - t0, 1), int(n)))
            await asyncio.sleep(2.0)
    finally:
        await conn.close()


async def run_cluster(*, nodes: int, replicas: int, devices: int, sensors: int, rate: float,
                      duration: float, node_kill_at: float, replica_kill_at: float,
                      restart_after: float, stall_s: float, dsn: str,
                      keep: bool) -> dict[str, Any]:
    run = uuid.uuid4().hex[:8]
    workdir = Path(tempfile.mkdtemp(prefix="pm-cluster-"))
    schema = f"pm_cluster_{run}"
    cfg_path = workdir / "cloud.toml"
    events: list[dict[str, Any]] = []
    t_start = time.monotonic()

    def event(what: str, **kw: Any) -> None:
        events.append({"t_s": round(time.monotonic() - t0, 1), "event": what, **kw})

    cluster = RabbitCluster(nodes, workdir=workdir / "rabbit")
    reps: list[Replica] = []
    fleet: AmqpFleet | None = None
    try:
        await cluster.start()
        write_cloud_config(cfg_path, hosts=cluster.hosts, dsn=dsn, schema=schema, run=run)
        reps = [Replica(i, cfg_path, workdir) for i in range(replicas)]
        await asyncio.gather(*(r.start() for r in reps))
        ready_s = time.monotonic() - t_start
        fleet = AmqpFleet(devices, cluster.hosts, workdir / "agents", exchange=f"cl{run}",
                          sensors=sensors, rate_hz=rate, chunk_max_age_s=1.0,
                          drain_timeout_s=90.0)
        cpu0 = _cpu_self()
        t0 = time.monotonic()
        timeline: list[tuple[float, int]] = []
        sampler = asyncio.create_task(_sample(dsn, schema, t0, timeline), name="sampler")
        await fleet.start()
        event("agents started", devices=devices)
        plan = sorted([(node_kill_at, "node"), (replica_kill_at, "replica")])
        restarts: list[tuple[float, str, int]] = []
        killed_node = killed_replica = -1
        for at, kind in plan:
            if at <= 0 or at >= duration:
                continue
            await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
            if kind == "node":
                killed_node = await _leader(cluster, f"cl{run}.ingest")
                event("node frozen", node=cluster.nodes[killed_node].nodename,
                      queue_leader=True)
                await cluster.kill(killed_node, stall_s=stall_s)
                event("node killed", node=cluster.nodes[killed_node].nodename)
            else:
                killed_replica = 0
                victim = reps[0].proc.proc
                if stall_s > 0 and victim is not None:
                    victim.send_signal(signal.SIGSTOP)
                    event("replica frozen", replica=reps[0].name)
                    await asyncio.sleep(stall_s)
                await reps[0].proc.kill9()
                reps[0].kills += 1
                event("replica killed", replica=reps[0].name)
            if restart_after > 0:
                restarts.append((time.monotonic() + restart_after, kind,
                                 killed_node if kind == "node" else killed_replica))
            failed = fleet.failed()
            if failed:
                raise RuntimeError(f"agents died: {failed[:3]}")
        end = t0 + duration
        for when, kind, idx in sorted(restarts):
            if when >= end:
                break
            await asyncio.sleep(max(0.0, when - time.monotonic()))
            if kind == "node":
                await cluster.restart(idx)
                event("node restarted", node=cluster.nodes[idx].nodename)
            else:
                await reps[idx].start()
                event("replica restarted", replica=reps[idx].name)
        await asyncio.sleep(max(0.0, end - time.monotonic()))
        event("sources stopping")
        agents = await fleet.stop()
        t_drained = time.monotonic()
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        event("agents drained", **{k: agents[k] for k in ("agents_stopped_cleanly",
                                                          "agents_not_stopped")})
        agents_cpu_s = _cpu_self() - cpu0
        reconnects = {r.name: r.log_text().count("AMQP ingest consuming") for r in reps}
        for r in reps:
            await r.proc.terminate(30)
        handled = {r.name: _stop_counts(r.log_text()) for r in reps}
        rows = await _rows(dsn, schema)
        audit = audit_rows(fleet.produced, rows)
        ledger = await _ledger(cfg_path)
        tot = ledger["totals"]
        unexplained = int(tot["unexplained"]) + audit["foreign"]
        duplicated = max(audit["duplicated"], int(tot["duplicates"]))
        stored = audit["stored_rows"] - audit["duplicated"]
        return {
            "rabbitmq_nodes": len(cluster.nodes),
            "ingest_replicas": len(reps),
            "node_kills": sum(n.kills for n in cluster.nodes),
            "replica_kills": sum(r.kills for r in reps),
            "lost": audit["lost"],
            "duplicated": duplicated,
            "unexplained": unexplained,
            "readings_produced": audit["produced"],
            "readings_stored": stored,
            "readings_per_s": round(stored / max(1e-9, t_drained - t0), 1),
            "offered_readings_per_s": devices * sensors * rate,
            "replica_cpu_s": {r.name: round(r.proc.cpu_now(), 2) for r in reps},
            "rabbitmq_node_cpu_s": {n.nodename.split("@")[0]: round(n.cpu_now(), 2)
                                    for n in cluster.nodes},
            "agents_and_harness_cpu_s": round(agents_cpu_s, 2),
            "audit": audit,
            "ledger": {"stored": tot["stored"], "unexplained": tot["unexplained"],
                       "duplicates": tot["duplicates"], "conflicts": tot["conflicts"],
                       "gaps": tot["gap_total"], "devices": len(ledger["devices"]),
                       "agrees_with_rows": tot["stored"] == audit["stored_rows"]},
            "agents": agents,
            "replica_reconnects": reconnects,
            # batches each replica answered / of them redelivered by the broker (a killed
            # replica's unacked ones, or ones whose ack a lost link did not carry); the
            # killed incarnation logs nothing
            "replica_batches_handled": {k: v[0] for k, v in handled.items()},
            "replica_batches_redelivered": {k: v[1] for k, v in handled.items()},
            "cluster_start_s": round(cluster.start_s, 1),
            "setup_s": round(ready_s, 1),
            "drain_s": round(t_drained - (t0 + duration), 1),
            "events": events,
            # readings in the table, sampled every 2 s: [seconds since the agents started,
            # rows]; shows the stall around each kill and the catch-up after it
            "stored_timeline": timeline,
        }
    finally:
        if fleet is not None:
            for d in fleet.devices:
                if d.task is not None and not d.task.done():
                    d.task.cancel()
        for r in reps:
            if r.proc.alive:
                await r.proc.kill9()
        await cluster.stop()
        if not keep:
            try:
                await drop_pg_schema(dsn, schema)
            except Exception as exc:  # the report matters more than the clean-up
                print(f"could not drop schema {schema}: {exc}", file=sys.stderr)
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept {workdir} and schema {schema}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from bench.common import emit
    from pymigrate.logsetup import setup_logging

    p = argparse.ArgumentParser(prog="python -m bench cluster",
                                description=(__doc__ or "").split("\n")[0])
    p.add_argument("--nodes", type=int, default=3, help="RabbitMQ nodes")
    p.add_argument("--replicas", type=int, default=3, help="pymigrate cloud processes")
    p.add_argument("--devices", type=int, default=20, help="agents (in this process)")
    p.add_argument("--sensors", type=int, default=10)
    p.add_argument("--rate", type=float, default=5.0, help="readings per sensor per second")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of production")
    p.add_argument("--node-kill-at", type=float, default=15.0, help="0 = no node kill")
    p.add_argument("--replica-kill-at", type=float, default=30.0, help="0 = no replica kill")
    p.add_argument("--restart-after", type=float, default=10.0, help="0 = stay dead")
    p.add_argument("--stall-s", type=float, default=2.0,
                   help="freeze (SIGSTOP) a victim this long before the kill -9")
    p.add_argument("--dsn", default=DEFAULT_DSN, help="PostgreSQL (a fresh schema is used)")
    p.add_argument("--keep", action="store_true", help="keep the work dir and the schema")
    a = p.parse_args(argv)
    why = rabbitmq_missing()
    if why:
        print(f"bench cluster: {why}", file=sys.stderr)
        return 2
    if a.nodes < 3 and a.node_kill_at > 0:
        print("bench cluster: a node kill needs >= 3 nodes (a quorum must survive)",
              file=sys.stderr)
        return 2
    setup_logging("console", "error", stream=sys.stderr)
    t = time.monotonic()
    res = asyncio.run(run_cluster(
        nodes=a.nodes, replicas=a.replicas, devices=a.devices, sensors=a.sensors,
        rate=a.rate, duration=a.duration, node_kill_at=a.node_kill_at,
        replica_kill_at=a.replica_kill_at, restart_after=a.restart_after, stall_s=a.stall_s,
        dsn=a.dsn, keep=a.keep))
    res["wall_s"] = round(time.monotonic() - t, 1)
    emit("cluster", {"nodes": a.nodes, "replicas": a.replicas, "devices": a.devices,
                     "sensors": a.sensors, "rate_hz": a.rate, "duration_s": a.duration,
                     "node_kill_at_s": a.node_kill_at, "replica_kill_at_s": a.replica_kill_at,
                     "restart_after_s": a.restart_after, "stall_before_kill_s": a.stall_s,
                     "store": "postgres",
                     "queue_type": "quorum",
                     "agents": "in-process agent.supervisor.Agent (buffer, uploader, "
                               "AmqpUplink), one event loop"}, res)
    ok = (res["lost"] == 0 and res["duplicated"] == 0 and res["unexplained"] == 0
          and res["ledger"]["agrees_with_rows"])
    return 0 if ok else 1
