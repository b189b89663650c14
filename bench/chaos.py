"""Chaos run with an exactly-once audit: ``python -m bench chaos --minutes M --seed S``.

Real processes on loopback: N ``pymigrate agent`` processes (each its own data dir and
config, an MQTT source on a local "sensor" Mosquitto fed by this harness), the fault
proxy (:mod:`simulators.netproxy`, one group per device) between the agents and an
uplink Mosquitto we own (persistence on, so it can be restarted), and ``pymigrate cloud``
writing to PostgreSQL (db ``test``, a fresh schema per run). While the harness publishes,
a seeded schedule injects, each at least ``--min-each`` times:

- ``agent_kill9``: SIGKILL an agent, restart it 0.5-3 s later;
- ``broker_restart``: stop the uplink broker (SIGTERM or SIGKILL), start it again;
- ``ingest_restart``: stop the cloud ingest (SIGTERM or SIGKILL), start it again;
- ``link_cut``: cut a device's link at the proxy (reset or blackhole) for 3-10 s;
- ``link_throttle``: 2-8 kbit/s with 100-300 ms latency for 5-15 s;
- ``clock_jump``: restart an agent with ``PYMIGRATE_CLOCK_OFFSET_MS`` (-1 day .. +1 h);
- ``quota_fill``: on a small-budget device, cut the link and publish a burst of LOW
  readings larger than its ``budget_bytes`` (eviction must trigger and be counted);
- ``buffer_corrupt``: cut a device's link, SIGKILL its agent, flip a byte in its oldest
  buffered chunk with sqlite3, restart it (the chunk must be quarantined and counted).

Then every link is healed, publishing stops, the agents drain, and the audit
(:mod:`bench._chaos_audit`) prints lost / duplicated / evicted / quarantined.
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
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import structlog

from bench._chaos_audit import Truth, agent_log_events, audit, key
from bench._chaos_env import Mosquitto, Proc, wait_until

log = structlog.get_logger("bench.chaos")

FAULTS = ("agent_kill9", "broker_restart", "ingest_restart", "link_cut", "link_throttle",
          "clock_jump", "quota_fill", "buffer_corrupt")
SMALL_BUDGET = 65536
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"


class Device:
    """One simulated gateway: its agent process, config, data dir and proxy group."""

    def __init__(self, run: ChaosRun, index: int) -> None:
        self.name = f"d{index:02d}"
        self.id = f"chaos-{run.run_id}-{self.name}"
        self.dir = run.workdir / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.small = index % 4 == 0
        self.topic = f"chaos/{run.run_id}/{self.name}"
        self.counter = 0  # unique value per reading of this device
        self.offset_ms = 0
        self.lock = asyncio.Lock()  # one process-level fault at a time per device
        self.run = run
        self.proc = Proc(["agent", "--config", str(self.dir / "agent.toml")],
                         self.dir / "agent.log", cwd=self.dir)

    def write_config(self, uplink_port: int, src_port: int) -> None:
        budget = SMALL_BUDGET if self.small else 64 * 1024 * 1024
        (self.dir / "agent.toml").write_text(f"""
[device]
id = "{self.id}"
data_dir = "{self.dir}"

[[sources]]
type = "mqtt"
host = "127.0.0.1"
port = {src_port}
topics = ["{self.topic}/#"]
qos = 1
client_id = "src-{self.id}"
format = "json"

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

[uplink]
transports = ["mqtt"]

[uplink.mqtt]
host = "127.0.0.1"
port = {uplink_port}
prefix = "chaos{self.run.run_id}"
keepalive_s = 5
connect_timeout_s = 3.0

[retry]
backoff_base_s = 0.2
backoff_cap_s = 3.0
breaker_open_base_s = 1.0
breaker_open_cap_s = 5.0
timeout_initial_s = 5.0
timeout_max_s = 15.0

[pipeline]
drain_timeout_s = 5.0

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
        return self.dir / "buffer.db"

    def pending(self) -> int:
        """Chunks + staged rows still in the buffer (0 when drained)."""
        if not self.buffer_path.exists():
            return 0
        try:
            con = sqlite3.connect(f"file:{self.buffer_path}?mode=ro", uri=True, timeout=2)
            try:
                n = con.execute("SELECT (SELECT count(*) FROM chunks) + "
                                "(SELECT count(*) FROM staging)").fetchone()[0]
            finally:
                con.close()
            return int(n)
        except sqlite3.Error:
            return 1


class ChaosRun:
    """Owns every process and the fault schedule of one run."""

    def __init__(self, *, minutes: float, seed: int, devices: int, rate: int,
                 pg_dsn: str, workdir: Path, min_each: int, burst: int,
                 drain_s: float) -> None:
        self.minutes = minutes
        self.seed = seed
        self.rng = random.Random(seed)
        self.run_id = f"{seed}{uuid.uuid4().hex[:6]}"
        self.schema = f"chaos_{self.run_id}"
        self.pg_dsn = pg_dsn
        self.workdir = workdir
        self.rate = rate
        self.min_each = min_each
        self.burst = burst
        self.drain_s = drain_s
        self.truth = Truth()
        self.faults: collections.Counter[str] = collections.Counter()
        self.fault_log: list[tuple[float, str, str]] = []
        self.src = Mosquitto(workdir, "src-broker", persistence=False,
                             extra="log_type subscribe\n")
        self.up = Mosquitto(workdir, "uplink-broker", persistence=True)
        self.devices = [Device(self, i) for i in range(devices)]
        self.cloud = Proc(["cloud", "--config", str(workdir / "cloud.toml")],
                          workdir / "cloud.log", cwd=workdir)
        self.proxy: Any = None
        self.pub: Any = None
        self.t0 = time.monotonic()
        self._publishing = True
        self._tasks: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ set-up
    def _cloud_config(self) -> None:
        (self.workdir / "cloud.toml").write_text(f"""
[log]
format = "json"
level = "warning"

[cloud]
store = "postgres"
listeners = ["mqtt"]

[cloud.postgres]
dsn = "{self.pg_dsn}"
schema = "{self.schema}"

[cloud.mqtt]
host = "127.0.0.1"
port = {self.up.port}
prefix = "chaos{self.run_id}"
share_group = "chaos{self.run_id}"
""")

    async def start(self) -> None:
        from simulators.netproxy import FaultProxy

        await self.src.start()
        await self.up.start()
        self.proxy = FaultProxy(("127.0.0.1", self.up.port),
                                groups=[d.name for d in self.devices],
                                rng=random.Random(self.seed + 1))
        await self.proxy.start()
        self._cloud_config()
        self.cloud.start()
        for d in self.devices:
            d.write_config(self.proxy.port(d.name), self.src.port)
            d.start()
        # the source sessions must exist before we publish (QoS 1, persistent session)
        sublog = self.src.dir / "mosquitto.log"
        ok = await wait_until(lambda: sublog.exists() and all(
            f"{d.topic}/#" in sublog.read_text(errors="replace") for d in self.devices), 90,
            step=0.5)
        if not ok:
            raise RuntimeError("agents did not start")
        await asyncio.sleep(1.0)

    # ------------------------------------------------------------------ workload
    async def publish_loop(self, end: float) -> None:
        """One message per device per second with ``rate`` readings (one alarm in ten)."""
        tick = 0
        while time.monotonic() < end and self._publishing:
            t_next = self.t0 + tick + 1.0
            for d in self.devices:
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
        now = time.time_ns() // 1_000_000
        for it in items:
            prio = str(it.get("priority", "low" if it["sensor"].startswith("bulk")
                              else "normal"))
            self.truth.add(d.id, it["sensor"], it["value"], prio, now)
        await self.pub.publish(f"{d.topic}/data", json.dumps(items).encode(), qos=1)

    # ------------------------------------------------------------------ faults
    def _note(self, kind: str, detail: str) -> None:
        self.faults[kind] += 1
        self.fault_log.append((round(time.monotonic() - self.t0, 1), kind, detail))
        log.info("fault", kind=kind, detail=detail)

    async def fault(self, kind: str) -> None:
        r = self.rng
        d = r.choice(self.devices)
        if kind == "agent_kill9":
            async with d.lock:
                await d.proc.kill9()
                self._note(kind, d.name)
                await asyncio.sleep(r.uniform(0.5, 3.0))
                d.start()
        elif kind == "broker_restart":
            hard = r.random() < 0.5
            self._note(kind, "SIGKILL" if hard else "SIGTERM")
            await self.up.restart(kill=hard, down_s=r.uniform(1.0, 4.0))
        elif kind == "ingest_restart":
            hard = r.random() < 0.5
            if hard:
                await self.cloud.kill9()
            else:
                await self.cloud.terminate(20)
            self._note(kind, "SIGKILL" if hard else "SIGTERM")
            await asyncio.sleep(r.uniform(1.0, 3.0))
            self.cloud.start()
        elif kind == "link_cut":
            mode = r.choice(("reset", "blackhole"))
            self.proxy.cut(d.name, mode=mode)
            self._note(kind, f"{d.name} {mode}")
            await asyncio.sleep(r.uniform(3.0, 10.0))
            self.proxy.restore(d.name)
        elif kind == "link_throttle":
            self.proxy.set(d.name, bandwidth_bps=r.uniform(250, 1000),
                           latency_ms=r.uniform(100, 300), jitter_ms=50)
            self._note(kind, d.name)
            await asyncio.sleep(r.uniform(5.0, 15.0))
            self.proxy.set(d.name, bandwidth_bps=0, latency_ms=0, jitter_ms=0)
        elif kind == "clock_jump":
            async with d.lock:
                d.offset_ms = r.choice((-86_400_000, -3_600_000, -120_000, 600_000,
                                        3_600_000))
                await d.proc.terminate(20)
                d.start()
                self._note(kind, f"{d.name} {d.offset_ms:+d} ms")
        elif kind == "quota_fill":
            small = [x for x in self.devices if x.small] or self.devices
            d = r.choice(small)
            self.proxy.cut(d.name, mode="blackhole")
            await self._burst(d, self.burst)
            self._note(kind, f"{d.name} {self.burst} low readings")
            await asyncio.sleep(r.uniform(4.0, 8.0))
            self.proxy.restore(d.name)
        elif kind == "buffer_corrupt":
            big = [x for x in self.devices if not x.small] or self.devices
            d = r.choice(big)
            async with d.lock:
                self.proxy.cut(d.name, mode="reset")
                await asyncio.sleep(r.uniform(2.5, 4.0))
                await d.proc.kill9()
                hit = await asyncio.to_thread(self._corrupt, d)
                d.start()
                if hit:
                    self._note(kind, f"{d.name} chunk {hit}")
                await asyncio.sleep(1.0)
                self.proxy.restore(d.name)

    async def _burst(self, d: Device, n: int) -> None:
        r = random.Random(self.rng.random())
        for start in range(0, n, 500):
            items = []
            for _ in range(min(500, n - start)):
                d.counter += 1
                items.append({"sensor": "bulk", "priority": "low",
                              "value": round(d.counter + r.random(), 6)})
            await self._publish(d, items)

    def _corrupt(self, d: Device) -> int | None:
        """Flip a byte in the oldest buffered chunk; remember its readings' keys."""
        from agent.buffer.evict import chunk_of
        from agent.codec import open_chunk

        con = sqlite3.connect(d.buffer_path, timeout=10)
        try:
            row = con.execute("SELECT id, device_id, priority, seq_first, seq_last, count, "
                              "ts_first, ts_last, codec, payload, checksum FROM chunks "
                              "ORDER BY id LIMIT 1").fetchone()
            if row is None:
                return None
            for rd in open_chunk(chunk_of(row[1:])):
                self.truth.quarantined.add(key(d.id, rd.sensor, rd.value))
            payload = bytearray(row[9])
            i = len(payload) // 2
            payload[i] ^= 0x5A
            con.execute("UPDATE chunks SET payload = ? WHERE id = ?", (bytes(payload), row[0]))
            con.commit()
            return int(row[0])
        finally:
            con.close()

    def schedule(self, start: float, end: float) -> list[tuple[float, str]]:
        kinds = [k for k in FAULTS for _ in range(self.min_each)]
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
        try:
            await self.fault(kind)
        except Exception as exc:  # a harness error must not stop the run
            log.error("fault failed", kind=kind, error=repr(exc))

    # ------------------------------------------------------------------ end
    async def heal(self) -> None:
        for d in self.devices:
            self.proxy.restore(d.name)
            self.proxy.set(d.name, bandwidth_bps=0, latency_ms=0, jitter_ms=0)
        if self.up.proc is None:
            await self.up.start()
        if not self.cloud.alive:
            self.cloud.start()
        for d in self.devices:
            if not d.proc.alive:
                d.start()

    async def stored(self) -> list[tuple[str, str, float, int]]:
        import asyncpg

        con = await asyncpg.connect(self.pg_dsn)
        try:
            rows = await con.fetch(f"SELECT device_id, sensor, value, ts_ms FROM "
                                   f"{self.schema}.readings")
        except asyncpg.UndefinedTableError:
            return []
        finally:
            await con.close()
        return [(r[0], r[1], float(r[2]), int(r[3])) for r in rows]

    async def drain(self) -> dict[str, Any]:
        """Wait (bounded) until every buffer is empty and the store count is stable."""
        t = time.monotonic()
        last, since = -1, time.monotonic()
        while time.monotonic() - t < self.drain_s:
            await asyncio.sleep(2.0)
            n = len(await self.stored())
            pending = sum(d.pending() for d in self.devices)
            if n != last:
                last, since = n, time.monotonic()
            if pending == 0 and time.monotonic() - since >= 6.0 and n > 0:
                break
        return {"drain_s": round(time.monotonic() - t, 1),
                "pending_chunks_at_end": sum(d.pending() for d in self.devices)}

    async def stop(self, keep: bool) -> dict[str, Any]:
        rcs = [await d.proc.terminate(30) for d in self.devices]
        await self.cloud.terminate(20)
        if self.proxy is not None:
            counters = self.proxy.counters()
            await self.proxy.close()
        await self.up.stop()
        await self.src.stop()
        if not keep:
            import asyncpg

            con = await asyncpg.connect(self.pg_dsn)
            try:
                await con.execute(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")
            finally:
                await con.close()
        return {"agents_clean_exit": sum(1 for rc in rcs if rc == 0),
                "proxy_bytes_up": counters.bytes_up, "proxy_bytes_down": counters.bytes_down}


async def run_chaos(*, minutes: float, seed: int, devices: int, rate: int = 5,
                    pg_dsn: str = DEFAULT_PG, workdir: Path | None = None,
                    min_each: int = 3, burst: int = 30000, drain_s: float = 120.0,
                    keep: bool = False) -> dict[str, Any]:
    """Run the whole chaos scenario and return the parameters' results (see module doc)."""
    own_dir = workdir is None
    wd = Path(tempfile.mkdtemp(prefix="pymigrate-chaos-")) if workdir is None else workdir
    run = ChaosRun(minutes=minutes, seed=seed, devices=devices, rate=rate, pg_dsn=pg_dsn,
                   workdir=wd, min_each=min_each, burst=burst, drain_s=drain_s)
    import aiomqtt

    try:
        await run.start()
        run.t0 = time.monotonic()
        total = minutes * 60.0
        plan = run.schedule(3.0, max(6.0, total - 15.0))
        async with aiomqtt.Client("127.0.0.1", run.src.port,
                                  identifier=f"chaos-pub-{run.run_id}") as pub:
            run.pub = pub
            pub_task = asyncio.create_task(run.publish_loop(run.t0 + total),
                                           name="chaos[publish]")
            await run.run_faults(plan)
            await pub_task
            await run.heal()
            drained = await run.drain()
        stored = await run.stored()
        ev_by_dev: dict[str, collections.Counter[str]] = {}
        quarantined_events = 0
        evicted_events: collections.Counter[str] = collections.Counter()
        for d in run.devices:
            evs = agent_log_events(d.dir / "agent.log")
            ev_by_dev[d.id] = evs["evicted"]
            evicted_events.update(evs["evicted"])
            quarantined_events += evs["quarantined"]
        result = audit(run.truth, stored, ev_by_dev)
        stop = await run.stop(keep)
        result.update({
            "faults": {k: run.faults[k] for k in FAULTS},
            "agent_evicted_readings_logged": dict(evicted_events),
            "agent_quarantine_events": quarantined_events,
            "agent_starts": sum(d.proc.starts for d in run.devices),
            **drained, **stop,
            "workdir": str(wd) if keep else None,
            "fault_log": run.fault_log,
        })
        return result
    finally:
        for d in run.devices:
            if d.proc.proc is not None:
                await d.proc.kill9()
        if run.cloud.proc is not None:
            await run.cloud.kill9()
        await run.up.stop(kill=True)
        await run.src.stop(kill=True)
        if own_dir and not keep:
            shutil.rmtree(wd, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    from bench.common import emit
    from pymigrate.logsetup import setup_logging

    p = argparse.ArgumentParser(prog="python -m bench chaos", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--devices", type=int, default=20)
    p.add_argument("--rate", type=int, default=5, help="readings per device per second")
    p.add_argument("--min-each", type=int, default=3, help="injections of each fault kind")
    p.add_argument("--burst", type=int, default=30000, help="LOW readings per quota_fill")
    p.add_argument("--drain-s", type=float, default=180.0)
    p.add_argument("--pg", default=os.environ.get("PYMIGRATE_TEST_PG", DEFAULT_PG))
    p.add_argument("--keep", action="store_true", help="keep the work dir and the schema")
    a = p.parse_args(argv)
    setup_logging("console", "info", stream=sys.stderr)
    t = time.monotonic()
    res = asyncio.run(run_chaos(minutes=a.minutes, seed=a.seed, devices=a.devices,
                                rate=a.rate, pg_dsn=a.pg, min_each=a.min_each,
                                burst=a.burst, drain_s=a.drain_s, keep=a.keep))
    res["wall_s"] = round(time.monotonic() - t, 1)
    fault_log = res.pop("fault_log")
    emit("chaos", {"minutes": a.minutes, "seed": a.seed, "devices": a.devices,
                   "rate_per_device_s": a.rate, "min_each": a.min_each, "burst": a.burst},
         res)
    print(json.dumps({"fault_log": fault_log}), file=sys.stderr)
    ok = res["lost"] == 0 and res["duplicated"] == 0 and all(
        v >= a.min_each for v in res["faults"].values())
    return 0 if ok else 1
