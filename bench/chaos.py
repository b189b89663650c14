"""Chaos run with a per-sequence-number audit: ``python -m bench chaos [--minutes M]``.

Real processes on loopback: N ``pymigrate agent`` processes (each its own data dir and
config, an MQTT source on a local "sensor" Mosquitto fed by this harness), the fault
proxy (:mod:`simulators.netproxy`, one group per device) between the agents and an
uplink Mosquitto we own (persistence on, so it can be restarted), and ``pymigrate cloud``
writing to a SQLite store (the store with the full completeness ledger). Device roles:
``d00`` has a small byte budget (eviction), ``d01`` keeps its data dir on a small tmpfs
(when root) and has a second MQTT source on the real Mosquitto at 1883 (poison), ``d02``
uploads over AMQP (RabbitMQ on 5672; the cloud-side rejection) and gets a twin: a second
agent process with the same device id. While the harness publishes, a seeded schedule
injects each fault kind of :mod:`bench._chaos_faults` ``--min-each`` times (kill -9,
broker and ingest restarts, link cuts and throttling, an 8-day clock jump, a quota burst,
a byte flip in a buffered chunk, a full filesystem, poison messages, two agents sharing an
id, an identity rejection, a blackhole then a reset then kill -9).

Then every link is healed, publishing stops, the agents drain and stop, and the audit
(:mod:`bench._chaos_audit`) accounts every (device, instance, seq) the agents numbered
(read from their buffer files) against the store and the gaps it keeps, and compares that
with ``pymigrate cloud completeness --json``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import structlog

from bench import _chaos_faults as faults
from bench._chaos_audit import Key, StreamTruth, Truth, audit, read_buffer_streams, read_store
from bench._chaos_env import (
    PY,
    ROOT,
    Mosquitto,
    Proc,
    free_port,
    mount_tmpfs,
    port_open,
    umount,
    wait_until,
)

log = structlog.get_logger("bench.chaos")

FAULTS = tuple(faults.FAULTS)
SMALL_BUDGET = 256 * 1024  # the minimum budget (database, WAL and sidecars included)
TWIN_BASE = 10_000_000  # the twin's values: distinct from its sibling's, same device id


class Device:
    """One simulated gateway: its agent process, config, data dir and proxy group."""

    def __init__(self, run: ChaosRun, index: int, *, twin_of: Device | None = None) -> None:
        self.name: str = f"d{index:02d}" if twin_of is None else f"{twin_of.name}b"
        self.id: str = twin_of.id if twin_of else f"chaos-{run.run_id}-{self.name}"
        self.dir = run.workdir / self.name
        self.data_dir = self.dir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.small: bool = twin_of.small if twin_of else index == 0
        self.tmpfs = False  # set by the run once the tmpfs is mounted
        self.poison = twin_of is None and index == 1
        self.amqp = twin_of is None and index == 2 and run.amqp_skip is None
        self.twin = twin_of is not None
        self.twin_of = twin_of
        self.active = twin_of is None  # the twin publishes once its fault started it
        self.topic = f"chaos/{run.run_id}/{self.name}"
        self.poison_topic = f"chaos{run.run_id}/poison/{self.name}"
        self.poison_client = f"poison-src-{run.run_id}-{self.name}"
        self.counter = TWIN_BASE if twin_of else 0  # unique value per reading of the id
        self.offset_ms = 0
        self.lock = asyncio.Lock()  # one process-level fault at a time per device
        self.run = run
        self.metrics_port = free_port()
        self.proc = Proc(["agent", "--config", str(self.dir / "agent.toml")],
                         self.dir / "agent.log", cwd=self.dir)

    def write_config(self) -> None:
        run = self.run
        budget = SMALL_BUDGET if self.small else 64 * 1024 * 1024
        poison = f"""
[[sources]]
type = "mqtt"
host = "127.0.0.1"
port = 1883
topics = ["{self.poison_topic}/#"]
qos = 1
client_id = "{self.poison_client}"
format = "json"
""" if self.poison and port_open(1883) else ""
        if self.amqp:
            uplink = f"""[uplink]
transports = ["amqp"]

[uplink.amqp]
host = "127.0.0.1"
port = 5672
exchange = "chaos{run.run_id}"
queue = "chaos{run.run_id}.ingest"
identity = "user_id"
connect_timeout_s = 3.0
"""
        else:
            uplink = f"""[uplink]
transports = ["mqtt"]

[uplink.mqtt]
host = "127.0.0.1"
port = {run.proxy.port(self.name)}
prefix = "chaos{run.run_id}"
keepalive_s = 5
connect_timeout_s = 3.0
"""
        (self.dir / "agent.toml").write_text(f"""
[device]
id = "{self.id}"
data_dir = "{self.data_dir}"

[[sources]]
type = "mqtt"
host = "127.0.0.1"
port = {run.src.port}
topics = ["{self.topic}/#"]
qos = 1
client_id = "src-{run.run_id}-{self.name}"
format = "json"
{poison}
[[priorities]]
match = "alarm*"
priority = "critical"

[[priorities]]
match = "bulk*"
priority = "low"

[buffer]
budget_bytes = {budget}
commit_window_ms = 50
chunk_max_age_s = 1.0

{uplink}
[retry]
backoff_base_s = 0.2
backoff_cap_s = 3.0
breaker_open_base_s = 1.0
breaker_open_cap_s = 3.0
timeout_initial_s = 5.0
timeout_max_s = 15.0

[pipeline]
drain_timeout_s = 5.0

[metrics]
enabled = true
port = {self.metrics_port}

[log]
format = "json"
level = "warning"
""")

    def start(self) -> None:
        self.proc.env = ({"PYMIGRATE_CLOCK_OFFSET_MS": str(self.offset_ms)}
                         if self.offset_ms else {})
        self.proc.start()

    @property
    def buffer_path(self) -> Path:
        return self.data_dir / "buffer.db"

    def log_count(self, event: str) -> int:
        p = self.dir / "agent.log"
        return p.read_text(errors="replace").count(f'"{event}"') if p.exists() else 0

    def pending(self) -> int:
        """Chunks + staged rows + gap records still in the buffer (0 when drained).

        A running agent holds its buffer exclusively: ask its metrics; a stopped one's
        buffer file is read directly."""
        if self.proc.alive:
            from agent.status import fetch

            try:
                _, m = fetch(f"http://127.0.0.1:{self.metrics_port}", timeout=2.0)
            except (OSError, ValueError):
                return 1
            p = "pymigrate_agent_"
            return int(m.get(p + "buffer_chunks_pending", 0)
                       + m.get(p + "buffer_chunks_in_flight", 0)
                       + sum(m.get(p + "buffer_readings_pending", {}).values())
                       + m.get(p + "buffer_gaps_pending", 1))
        if not self.buffer_path.exists():
            return 0
        try:
            con = sqlite3.connect(f"file:{self.buffer_path}?mode=ro", uri=True, timeout=2)
            try:
                n = con.execute("SELECT (SELECT count(*) FROM chunks) + "
                                "(SELECT count(*) FROM staging) + "
                                "(SELECT count(*) FROM gaps)").fetchone()[0]
            finally:
                con.close()
            return int(n)
        except sqlite3.Error:
            return 1


class ChaosRun:
    """Owns every process and the fault schedule of one run."""

    def __init__(self, *, minutes: float, seed: int, devices: int, rate: int, workdir: Path,
                 min_each: int, burst: int, drain_s: float, pace: float = 1.0,
                 tmpfs_kb: int = 16384, poison_kb: int = 4096, poison_depth: int = 100_000,
                 kinds: tuple[str, ...] = FAULTS) -> None:
        self.minutes = minutes
        self.seed = seed
        self.rng = random.Random(seed)
        self.run_id = f"{seed}{uuid.uuid4().hex[:6]}"
        self.workdir = workdir
        self.rate = rate
        self.min_each = min_each
        self.burst_n = burst
        self.drain_s = drain_s
        self.pace = pace
        self.kinds = kinds
        self.tmpfs_bytes = tmpfs_kb * 1024
        self.poison_kb = poison_kb
        self.poison_depth = poison_depth
        self.truth = Truth()
        self.truth.open_csv(workdir / "produced.csv")
        self.tags: dict[str, set[Key]] = {}
        self.faults: collections.Counter[str] = collections.Counter()
        self.results: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        self.skipped: dict[str, str] = {}
        self.fault_log: list[tuple[float, str, str]] = []
        self.src = Mosquitto(workdir, "src-broker", persistence=False,
                             extra="log_type subscribe\n")
        self.up = Mosquitto(workdir, "uplink-broker", persistence=True)
        self.amqp_skip = None if port_open(5672) else "no RabbitMQ on 127.0.0.1:5672"
        self.devices = [Device(self, i) for i in range(devices)]
        # a cloned SD card: same config (device id, MQTT client id), its own data dir
        self.twin = (Device(self, 0, twin_of=self.devices[3 if devices >= 4 else 0])
                     if devices >= 3 else None)
        self.tmpfs_skip: str | None = "needs --devices >= 2"
        self.cloud = Proc(["cloud", "--config", str(workdir / "cloud.toml")],
                          workdir / "cloud.log", cwd=workdir)
        self.cloud_lock = asyncio.Lock()
        self.proxy: Any = None
        self.pub: Any = None
        self.t0 = time.monotonic()
        self._publishing = True
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def all_agents(self) -> list[Device]:
        return [*self.devices, *([self.twin] if self.twin else [])]

    def active_devices(self) -> list[Device]:
        return [d for d in self.all_agents if d.active]

    def proxied_devices(self) -> list[Device]:
        return [d for d in self.active_devices() if not d.amqp]

    @property
    def store_path(self) -> Path:
        return self.workdir / "cloud.db"

    # ------------------------------------------------------------------ set-up
    def write_cloud_config(self, identity: str = "routing_key") -> None:
        amqp = any(d.amqp for d in self.devices)
        listeners = '["mqtt", "amqp"]' if amqp else '["mqtt"]'
        amqp_table = f"""
[cloud.amqp]
host = "127.0.0.1"
port = 5672
exchange = "chaos{self.run_id}"
queue = "chaos{self.run_id}.ingest"
identity = "{identity}"
""" if amqp else ""
        (self.workdir / "cloud.toml").write_text(f"""
[log]
format = "json"
level = "warning"

[cloud]
store = "sqlite"
listeners = {listeners}

[cloud.sqlite]
path = "{self.store_path}"

[cloud.mqtt]
host = "127.0.0.1"
port = {self.up.port}
prefix = "chaos{self.run_id}"
share_group = "chaos{self.run_id}"
{amqp_table}""")

    async def start(self) -> None:
        from simulators.netproxy import FaultProxy

        if len(self.devices) >= 2:
            d1 = self.devices[1]
            self.tmpfs_skip = mount_tmpfs(d1.data_dir, self.tmpfs_bytes)
            d1.tmpfs = self.tmpfs_skip is None
        await self.src.start()
        await self.up.start()
        self.proxy = FaultProxy(("127.0.0.1", self.up.port),
                                groups=[d.name for d in self.all_agents],
                                rng=random.Random(self.seed + 1))
        await self.proxy.start()
        self.write_cloud_config()
        self.cloud.start()
        for d in self.all_agents:
            d.write_config()
        for d in self.devices:
            d.start()
        if not await self.wait_subscribed(self.devices, 90):
            tails = {d.name: (d.dir / "agent.log").read_text(errors="replace")[-1500:]
                     if (d.dir / "agent.log").exists() else "(no log)" for d in self.devices}
            raise RuntimeError(f"agents did not start; their logs end with: {tails}")
        await asyncio.sleep(1.0)

    async def wait_subscribed(self, devs: list[Device], limit_s: float) -> bool:
        """The source sessions must exist before we publish (QoS 1, persistent session)."""
        sublog = self.src.dir / "mosquitto.log"
        return await wait_until(lambda: sublog.exists() and all(
            f"{d.topic}/#" in sublog.read_text(errors="replace") for d in devs), limit_s,
            step=0.5)

    # ------------------------------------------------------------------ workload
    @staticmethod
    def now_ms() -> int:
        return time.time_ns() // 1_000_000

    def truth_add(self, d: Device, sensor: str, value: float, prio: str, t_ms: int) -> Key:
        self.truth.add(d.id, sensor, value, prio, t_ms)
        return (d.id, sensor, round(float(value), 6))

    async def publish_loop(self, end: float) -> None:
        """One message per device per second with ``rate`` readings (one alarm in ten)."""
        tick = 0
        while time.monotonic() < end and self._publishing:
            t_next = self.t0 + tick + 1.0
            for d in self.active_devices():
                items = []
                for j in range(self.rate):
                    d.counter += 1
                    alarm = (d.counter % 10) == 0
                    sensor = "alarm" if alarm else f"s{j % 3}"
                    items.append({"sensor": sensor, "value": float(d.counter),
                                  **({"priority": "critical"} if alarm else {})})
                await self._publish(d, items)
            tick += 1
            await asyncio.sleep(max(0.0, t_next - time.monotonic()))

    async def _publish(self, d: Device, items: list[dict[str, Any]]) -> None:
        now = self.now_ms()
        for it in items:
            prio = str(it.get("priority", "low" if it["sensor"].startswith("bulk")
                              else "normal"))
            k = self.truth_add(d, it["sensor"], it["value"], prio, now)
            if d.twin or (self.twin is not None and d is self.twin.twin_of):
                self.tags.setdefault("shared_id_pair", set()).add(k)
            elif d.amqp:
                self.tags.setdefault("amqp_device", set()).add(k)
        await self.pub.publish(f"{d.topic}/data", json.dumps(items).encode(), qos=1)

    async def burst(self, d: Device, n: int, sensor: str) -> None:
        r = random.Random(self.rng.random())
        for start in range(0, n, 500):
            items = []
            for _ in range(min(500, n - start)):
                d.counter += 1
                # full-precision fractions: they compress poorly, so a burst really
                # outgrows a small budget (the integer part keeps values unique)
                items.append({"sensor": sensor, "priority": "low",
                              "value": d.counter + r.random() * 0.5})
            await self._publish(d, items)

    # ------------------------------------------------------------------ faults
    def schedule(self, start: float, end: float) -> list[tuple[float, str]]:
        kinds = [k for k in self.kinds for _ in range(self.min_each)]
        self.rng.shuffle(kinds)
        step = (end - start) / max(1, len(kinds))
        return [(start + i * step + self.rng.uniform(0, step * 0.5), k)
                for i, k in enumerate(kinds)]

    async def run_faults(self, plan: list[tuple[float, str]]) -> None:
        for at, kind in plan:
            await asyncio.sleep(max(0.0, at - (time.monotonic() - self.t0)))
            t = asyncio.create_task(self._guarded(kind), name=f"chaos[{kind}]")
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)
        if self._tasks:
            await asyncio.gather(*list(self._tasks))

    async def _guarded(self, kind: str) -> None:
        r = random.Random(self.rng.random())
        t = round(time.monotonic() - self.t0, 1)
        try:
            res = await faults.FAULTS[kind](self, r)
        except faults.Skip as exc:
            self.skipped[kind] = str(exc)
            log.warning("fault skipped", kind=kind, reason=str(exc))
            return
        except Exception as exc:  # a harness error must not stop the run
            log.error("fault failed", kind=kind, error=repr(exc))
            self.results[kind].append({"error": repr(exc)})
            return
        self.faults[kind] += 1
        self.results[kind].append(res)
        self.fault_log.append((t, kind, json.dumps(res, sort_keys=True)))
        log.info("fault", kind=kind, **res)

    # ------------------------------------------------------------------ end
    async def heal(self) -> None:
        for d in self.all_agents:
            self.proxy.restore(d.name)
            self.proxy.set(d.name, bandwidth_bps=0, latency_ms=0, jitter_ms=0)
        if self.up.proc is None:
            await self.up.start()
        if not self.cloud.alive:
            self.cloud.start()
        for d in self.active_devices():
            if not d.proc.alive:
                d.start()

    def stored_count(self) -> int:
        if not self.store_path.exists():
            return 0
        try:
            con = sqlite3.connect(f"file:{self.store_path}?mode=ro", uri=True, timeout=5)
            try:
                return int(con.execute("SELECT COUNT(*) FROM readings").fetchone()[0])
            finally:
                con.close()
        except sqlite3.Error:
            return -1

    async def drain(self) -> dict[str, Any]:
        """Wait (bounded) until every buffer is empty and the store count is stable."""
        t = time.monotonic()
        last, since = -1, time.monotonic()
        while time.monotonic() - t < self.drain_s:
            await asyncio.sleep(1.0)
            n = self.stored_count()
            pending = sum(d.pending() for d in self.active_devices())
            if n != last:
                last, since = n, time.monotonic()
            if pending == 0 and time.monotonic() - since >= 3.0 and n > 0:
                break
        return {"drain_s": round(time.monotonic() - t, 1),
                "pending_at_end": sum(d.pending() for d in self.active_devices())}

    async def stop(self) -> dict[str, Any]:
        rcs = [await d.proc.terminate(30) for d in self.active_devices()]
        async with self.cloud_lock:
            await self.cloud.terminate(20)
        counters = self.proxy.counters()
        await self.proxy.close()
        await self.up.stop()
        await self.src.stop()
        return {"agents_clean_exit": sum(1 for rc in rcs if rc == 0), "agents": len(rcs),
                "proxy_bytes_up": counters.bytes_up, "proxy_bytes_down": counters.bytes_down}

    def ledger_report(self) -> dict[str, Any] | None:
        """``pymigrate cloud completeness --json``, the command a user runs."""
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get(
            "PYTHONPATH", "")}
        r = subprocess.run([PY, "-m", "pymigrate.cli", "cloud", "completeness", "--config",
                            str(self.workdir / "cloud.toml"), "--json"], capture_output=True,
                           text=True, timeout=120, env=env, check=False)
        try:
            return dict(json.loads(r.stdout))
        except ValueError:
            log.error("completeness failed", rc=r.returncode, stderr=r.stderr[-500:])
            return None

    def agent_events(self) -> dict[str, int]:
        names = ("buffer.evicted", "buffer.quarantined", "uploader.blocked",
                 "uploader.unblocked", "uploader.dead_letter", "uploader.send_task_failed",
                 "buffer.append_failed")
        out: collections.Counter[str] = collections.Counter()
        for d in self.all_agents:
            for n in names:
                out[n] += d.log_count(n)
            out["tracebacks"] += (d.dir / "agent.log").read_text(errors="replace").count(
                "Traceback") if (d.dir / "agent.log").exists() else 0
        return dict(out)

    async def cleanup_amqp(self) -> None:
        if not any(d.amqp for d in self.devices):
            return
        try:
            import aio_pika

            con = await aio_pika.connect("amqp://guest:guest@127.0.0.1:5672/", timeout=5)
            async with con:
                ch = await con.channel()
                await ch.queue_delete(f"chaos{self.run_id}.ingest")
                await ch.exchange_delete(f"chaos{self.run_id}")
        except Exception as exc:  # best effort: the names are unique to this run
            log.warning("amqp cleanup failed", error=repr(exc))


def tag_report(run: ChaosRun, stored_keys: set[Key]) -> dict[str, Any]:
    return {t: {"produced": len(ks), "stored": len(ks & stored_keys)}
            for t, ks in sorted(run.tags.items())}


async def run_chaos(*, minutes: float, seed: int, devices: int, rate: int = 5,
                    workdir: Path | None = None, min_each: int = 1, burst: int = 20000,
                    drain_s: float = 90.0, keep: bool = False, pace: float = 1.0,
                    tmpfs_kb: int = 16384, poison_kb: int = 4096,
                    kinds: tuple[str, ...] = FAULTS) -> dict[str, Any]:
    """Run the whole chaos scenario and return the figures (see the module doc)."""
    own_dir = workdir is None
    wd = Path(tempfile.mkdtemp(prefix="pymigrate-chaos-")) if workdir is None else workdir
    run = ChaosRun(minutes=minutes, seed=seed, devices=devices, rate=rate, workdir=wd,
                   min_each=min_each, burst=burst, drain_s=drain_s, pace=pace,
                   tmpfs_kb=tmpfs_kb, poison_kb=poison_kb, kinds=kinds)
    import aiomqtt

    try:
        await run.start()
        run.t0 = time.monotonic()
        total = minutes * 60.0
        plan = run.schedule(2.0, max(4.0, total - 8.0 * pace))
        async with aiomqtt.Client("127.0.0.1", run.src.port,
                                  identifier=f"chaos-pub-{run.run_id}") as pub:
            run.pub = pub
            pub_task = asyncio.create_task(run.publish_loop(run.t0 + total),
                                           name="chaos[publish]")
            await run.run_faults(plan)
            await pub_task
            await run.heal()
            drained = await run.drain()
        stop = await run.stop()
        run.truth.close()
        streams: list[StreamTruth] = []
        for d in run.all_agents:
            streams.extend(read_buffer_streams(d.buffer_path, d.name))
        store = read_store(run.store_path)
        ledger = run.ledger_report()
        result = audit(run.truth, streams, store, ledger)
        from bench._chaos_audit import key

        stored_keys = {key(r[0], r[3], r[4]) for r in store.rows}
        result.update({
            "faults": {k: run.faults[k] for k in run.kinds},
            "faults_skipped": dict(run.skipped),
            "fault_results": {k: v for k, v in run.results.items()},
            "tags": tag_report(run, stored_keys),
            "agent_events": run.agent_events(),
            "agent_starts": sum(d.proc.starts for d in run.all_agents),
            **drained, **stop,
            "workdir": str(wd) if keep else None,
            "fault_log": run.fault_log,
        })
        return result
    finally:
        run.truth.close()
        for d in run.all_agents:
            if d.proc.proc is not None:
                await d.proc.kill9()
        if run.cloud.proc is not None:
            await run.cloud.kill9()
        if run.proxy is not None:
            await run.proxy.close()
        await run.up.stop(kill=True)
        await run.src.stop(kill=True)
        await run.cleanup_amqp()
        for d in run.devices:
            if d.tmpfs:
                if keep:  # keep what the full filesystem held
                    shutil.copytree(d.data_dir, d.dir / "data-tmpfs-copy", dirs_exist_ok=True)
                umount(d.data_dir)
        if own_dir and not keep:
            shutil.rmtree(wd, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    from bench.common import emit
    from pymigrate.logsetup import setup_logging

    p = argparse.ArgumentParser(prog="python -m bench chaos", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--devices", type=int, default=6)
    p.add_argument("--rate", type=int, default=5, help="readings per device per second")
    p.add_argument("--min-each", type=int, default=1, help="injections of each fault kind")
    p.add_argument("--burst", type=int, default=20000,
                   help="LOW readings per quota_fill / disk_full")
    p.add_argument("--drain-s", type=float, default=90.0)
    p.add_argument("--pace", type=float, default=1.0, help="fault durations x this")
    p.add_argument("--tmpfs-kb", type=int, default=16384, help="size of the full filesystem")
    p.add_argument("--poison-kb", type=int, default=4096, help="size of the huge payload")
    p.add_argument("--faults", default=",".join(FAULTS), help="comma-separated kinds")
    p.add_argument("--keep", action="store_true", help="keep the work dir")
    a = p.parse_args(argv)
    kinds = tuple(k for k in a.faults.split(",") if k)
    bad = [k for k in kinds if k not in FAULTS]
    if bad:
        p.error(f"unknown fault kinds {bad} (known: {', '.join(FAULTS)})")
    setup_logging("console", "info", stream=sys.stderr)
    t = time.monotonic()
    res = asyncio.run(run_chaos(minutes=a.minutes, seed=a.seed, devices=a.devices,
                                rate=a.rate, min_each=a.min_each, burst=a.burst,
                                drain_s=a.drain_s, keep=a.keep, pace=a.pace,
                                tmpfs_kb=a.tmpfs_kb, poison_kb=a.poison_kb, kinds=kinds))
    res["wall_s"] = round(time.monotonic() - t, 1)
    fault_log = res.pop("fault_log")
    emit("chaos", {"minutes": a.minutes, "seed": a.seed, "devices": a.devices,
                   "rate_per_device_s": a.rate, "min_each": a.min_each, "burst": a.burst,
                   "pace": a.pace, "tmpfs_kb": a.tmpfs_kb, "poison_kb": a.poison_kb,
                   "faults": list(kinds), "store": "sqlite"}, res)
    print(json.dumps({"fault_log": fault_log}), file=sys.stderr)
    ok = (res["unexplained"] == 0 and res["still_buffered"] == 0 and res["duplicates"] == 0
          and res["content_duplicates"] == 0 and res["ledger"]["agrees"])
    return 0 if ok else 1
