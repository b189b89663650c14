"""PyMigrate IoT next to the usual do-it-yourself answer: ``python -m bench peer-bridge``.

The peer: a local (edge) Mosquitto bridging to a "cloud" Mosquitto, both with
persistence, the bridge with ``cleansession false``, QoS 1, ``bridge_attempt_unsubscribe
false``, ``queue_qos0_messages false``, queue limits ``max_queued_messages`` /
``max_queued_bytes`` (set to the same 64 MiB budget as the agent's buffer) and
``autosave_interval``. A durable subscriber on the cloud broker is the "cloud".

PyMigrate IoT: the same sensor messages go to a local Mosquitto, ``pymigrate agent``
(MQTT source, durable buffer) uploads through MQTT to the same kind of cloud broker,
``pymigrate cloud`` writes them to SQLite.

Both get the same recorded workload (a CSV from ``tests/data`` replayed as one JSON
message per row, accelerated) and the same schedule through the same fault proxy
(:mod:`simulators.netproxy`) between edge and cloud: a link cut (reset), the edge process
SIGKILLed during that outage (the bridge broker / the agent), the cloud broker restarted,
a blackhole. The sensor publisher retries while its local broker is down, so every
difference is the edge's doing. Reported for both: readings lost, duplicates, bytes on the
wire (proxy counters, both directions), peak bytes on disk at the edge, delivery lag
p50/p99 (first publish -> cloud receipt), edge CPU seconds (local broker + bridge or
agent). Plus the Telegraf-style baseline: line protocol, gzip, batches of 1000 lines
(payload bytes only, no HTTP/TCP overhead).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import csv
import gzip
import json
import shutil
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from bench._chaos_env import ROOT, Mosquitto, Proc, wait_until

log = structlog.get_logger("bench.peer_bridge")
DATA = ROOT / "tests" / "data" / "cycling_1hz.csv"


@dataclass
class Workload:
    rows: list[tuple[int, dict[str, float]]]

    @property
    def readings(self) -> int:
        """Readings per run: the CSV fields plus the ``row`` counter of each message."""
        return sum(len(f) + 1 for _, f in self.rows)

    def payload(self, i: int, ts_ms: int) -> bytes:
        """Row ``i`` stamped at ``ts_ms`` (the sensor's clock when it first sent it), with
        its index as an extra ``row`` reading: the audit's natural key is (row, sensor)."""
        return json.dumps({"ts": ts_ms, "row": i, **self.rows[i][1]},
                          separators=(",", ":")).encode()


def load_workload(path: Path, rows: int) -> Workload:
    from agent.sources.replay import parse_timestamp

    out: list[tuple[int, dict[str, float]]] = []
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        for rec in reader:
            if len(out) >= rows:
                break
            fields = {}
            for name, v in zip(header[1:], rec[1:], strict=False):
                try:
                    fields[name] = float(v)
                except ValueError:
                    continue
            if fields:
                out.append((parse_timestamp(rec[0]), fields))
    return Workload(out)


def telegraf_bytes(w: Workload, batch: int = 1000) -> dict[str, int]:
    """Line protocol (one line per row, all fields), gzip per batch of ``batch`` lines."""
    from pymigrate.lineproto import to_line_protocol
    from pymigrate.types import Reading

    total = raw = 0
    for i in range(0, len(w.rows), batch):
        rs = [Reading("edge-1", k, ts, v) for ts, f in w.rows[i:i + batch]
              for k, v in f.items()]
        text = to_line_protocol(rs, "cycling", precision="ms").encode()
        raw += len(text)
        total += len(gzip.compress(text))
    return {"bytes_gzip": total, "bytes_raw_line_protocol": raw}


@dataclass
class Side:
    """What one system's run measured."""

    first_pub_ms: dict[int, int] = field(default_factory=dict)  # row -> first attempt
    received: list[tuple[int, str, int]] = field(default_factory=list)  # (row, sensor, recv)
    disk_peak: int = 0
    cpu_s: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0

    def report(self, w: Workload) -> dict[str, Any]:
        counts: collections.Counter[tuple[int, str]] = collections.Counter()
        lags: list[int] = []
        for row, sensor, recv in self.received:
            counts[(row, sensor)] += 1
            if counts[(row, sensor)] == 1 and row in self.first_pub_ms:
                lags.append(recv - self.first_pub_ms[row])
        expected = {(i, s) for i, (_, f) in enumerate(w.rows) for s in [*f, "row"]}
        lags.sort()

        def pct(p: float) -> int | None:
            return lags[min(len(lags) - 1, int(p * len(lags)))] if lags else None

        return {
            "readings_sent": len(expected),
            "readings_lost": len(expected - set(counts)),
            "duplicates": sum(n - 1 for n in counts.values() if n > 1),
            "bytes_on_wire": self.bytes_up + self.bytes_down,
            "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
            "edge_disk_peak_bytes": self.disk_peak,
            "lag_ms_p50": pct(0.5), "lag_ms_p99": pct(0.99),
            "edge_cpu_s": round(self.cpu_s, 2),
        }


class Publisher:
    """The sensor: one QoS 1 message per row at ``rate`` rows/s; retries while its local
    broker is down (in-memory, like a client library's offline queue)."""

    def __init__(self, port: Callable[[], int], topic: str, w: Workload, rate: float,
                 side: Side) -> None:
        self.port, self.topic, self.w, self.rate, self.side = port, topic, w, rate, side
        self._last = 0

    async def run(self) -> None:
        import aiomqtt

        t0 = time.monotonic()
        i = 0
        while i < len(self.w.rows):
            try:
                async with aiomqtt.Client("127.0.0.1", self.port(),
                                          identifier=f"sensor-{uuid.uuid4().hex[:6]}",
                                          timeout=3) as c:
                    while i < len(self.w.rows):
                        await asyncio.sleep(max(0.0, t0 + i / self.rate - time.monotonic()))
                        if i not in self.side.first_pub_ms:
                            # strictly increasing: two rows sent in one millisecond (a
                            # late timer) must not share a timestamp (edge dedup key)
                            self._last = max(time.time_ns() // 1_000_000, self._last + 1)
                            self.side.first_pub_ms[i] = self._last
                        ts = self.side.first_pub_ms[i]
                        await c.publish(self.topic, self.w.payload(i, ts), qos=1)
                        i += 1
            except aiomqtt.MqttError:
                await asyncio.sleep(0.2)


async def _sample_disk(side: Side, paths: Callable[[], list[Path]], stop: asyncio.Event) -> None:
    while not stop.is_set():
        n = 0
        for p in paths():
            try:
                n += p.stat().st_size
            except OSError:
                pass
        side.disk_peak = max(side.disk_peak, n)
        try:
            await asyncio.wait_for(stop.wait(), 0.25)
        except TimeoutError:
            pass


Action = Callable[[], Awaitable[None]]


async def run_schedule(proxy: Any, edge_kill: Action, cloud_restart: Action,
                       duration: float) -> list[str]:
    """The shared outage/restart schedule (fractions of the publishing time)."""
    done: list[str] = []
    t0 = time.monotonic()

    async def at(frac: float) -> None:
        await asyncio.sleep(max(0.0, t0 + frac * duration - time.monotonic()))

    await at(0.10)
    proxy.cut(mode="reset")
    done.append("cut(reset)")
    await at(0.30)
    await edge_kill()  # during the outage: the edge holds a backlog
    done.append("edge SIGKILL")
    await at(0.42)
    proxy.restore()
    done.append("restore")
    await at(0.60)
    await cloud_restart()
    done.append("cloud broker restart")
    await at(0.75)
    proxy.cut(mode="blackhole")
    done.append("cut(blackhole)")
    await at(0.85)
    proxy.restore()
    done.append("restore")
    return done


async def _drain(progress: Callable[[], Awaitable[int]], target: int, limit_s: float) -> float:
    t = time.monotonic()
    last, since = -1, time.monotonic()
    while time.monotonic() - t < limit_s:
        n = await progress()
        if n >= target:
            break
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since > 15:
            break
        await asyncio.sleep(0.5)
    return round(time.monotonic() - t, 1)


# ------------------------------------------------------------------------ the bridge
async def run_bridge(wd: Path, w: Workload, rate: float, duration: float, *,
                     queue_msgs: int, queue_bytes: int, autosave_s: int,
                     drain_s: float) -> dict[str, Any]:
    import aiomqtt

    from simulators.netproxy import FaultProxy

    side = Side()
    cloud = Mosquitto(wd, "bridge-cloud", persistence=True)
    await cloud.start()
    proxy = FaultProxy(("127.0.0.1", cloud.port))
    await proxy.start()
    run = uuid.uuid4().hex[:6]
    edge = Mosquitto(wd, "bridge-edge", persistence=True, max_queued=queue_msgs,
                     autosave_s=autosave_s, extra=f"""
max_queued_bytes {queue_bytes}
queue_qos0_messages false
connection cloud-{run}
address 127.0.0.1:{proxy.port()}
remote_clientid edge-bridge-{run}
cleansession false
bridge_attempt_unsubscribe false
bridge_protocol_version mqttv311
keepalive_interval 5
restart_timeout 1 5
notifications false
topic # out 1 local/ bridge/{run}/
""")
    await edge.start()
    stop = asyncio.Event()
    seen = 0

    async def sink() -> None:
        nonlocal seen
        while not stop.is_set():
            try:
                async with aiomqtt.Client("127.0.0.1", cloud.port, identifier=f"sink-{run}",
                                          clean_session=False, timeout=3) as c:
                    await c.subscribe(f"bridge/{run}/#", qos=1)
                    async for m in c.messages:
                        recv = time.time_ns() // 1_000_000
                        doc = json.loads(bytes(m.payload))
                        doc.pop("ts")
                        row = int(doc["row"])
                        side.received.extend((row, s, recv) for s in doc)
                        seen += 1
            except aiomqtt.MqttError:
                await asyncio.sleep(0.2)

    sink_task = asyncio.create_task(sink(), name="peer[sink]")
    await asyncio.sleep(1.0)
    disk = asyncio.create_task(_sample_disk(side, lambda: [edge.dir / "mosquitto.db"], stop))
    pub = Publisher(lambda: edge.port, "local/cycling", w, rate, side)
    pub_task = asyncio.create_task(pub.run(), name="peer[publish]")
    sched = await run_schedule(
        proxy, lambda: edge.restart(kill=True, down_s=2.0),
        lambda: cloud.restart(kill=False, down_s=3.0), duration)
    await pub_task

    async def progress() -> int:
        return seen

    drained = await _drain(progress, len(w.rows), drain_s)
    stop.set()
    sink_task.cancel()
    await asyncio.gather(sink_task, disk, return_exceptions=True)
    c = proxy.counters()
    side.bytes_up, side.bytes_down = c.bytes_up, c.bytes_down
    await proxy.close()
    await edge.stop()
    side.cpu_s = edge.cpu_s
    await cloud.stop()
    res = side.report(w)
    res.update({"drain_s": drained, "schedule": sched,
                "settings": {"max_queued_messages": queue_msgs,
                             "max_queued_bytes": queue_bytes,
                             "autosave_interval": autosave_s}})
    return res


# ------------------------------------------------------------------------ PyMigrate
async def run_pymigrate(wd: Path, w: Workload, rate: float, duration: float, *,
                        chunk_age_s: float, drain_s: float) -> dict[str, Any]:
    from simulators.netproxy import FaultProxy

    side = Side()
    cloud = Mosquitto(wd, "pm-cloud", persistence=True)
    await cloud.start()
    src = Mosquitto(wd, "pm-local", persistence=False)
    await src.start()
    proxy = FaultProxy(("127.0.0.1", cloud.port))
    await proxy.start()
    run = uuid.uuid4().hex[:6]
    dev = wd / "pm-agent"
    dev.mkdir()
    (dev / "agent.toml").write_text(f"""
[device]
id = "peer-{run}"
data_dir = "{dev}"

[[sources]]
type = "mqtt"
host = "127.0.0.1"
port = {src.port}
topics = ["local/#"]
qos = 1
client_id = "pm-src-{run}"
format = "json"

[buffer]
commit_window_ms = 100
chunk_max_age_s = {chunk_age_s}

[uplink]
transports = ["mqtt"]

[uplink.mqtt]
host = "127.0.0.1"
port = {proxy.port()}
prefix = "peer{run}"
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
    (wd / "pm-cloud.toml").write_text(f"""
[log]
level = "warning"

[cloud]
store = "sqlite"
listeners = ["mqtt"]

[cloud.sqlite]
path = "{wd / 'pm-cloud.db'}"

[cloud.mqtt]
host = "127.0.0.1"
port = {cloud.port}
prefix = "peer{run}"
share_group = "peer{run}"
""")
    ingest = Proc(["cloud", "--config", str(wd / "pm-cloud.toml")], wd / "pm-cloud.log")
    ingest.start()
    agent = Proc(["agent", "--config", str(dev / "agent.toml")], dev / "agent.log", cwd=dev)
    agent.start()
    if not await wait_until(lambda: (dev / "buffer.db").exists()
                            and (wd / "pm-cloud.db").exists(), 60):
        raise RuntimeError("agent or ingest did not start")
    await asyncio.sleep(2.0)  # the source's persistent session is subscribed
    stop = asyncio.Event()
    disk = asyncio.create_task(_sample_disk(
        side, lambda: [dev / "buffer.db", dev / "buffer.db-wal"], stop))

    async def edge_kill() -> None:
        await agent.kill9()
        await asyncio.sleep(2.0)
        agent.start()

    pub = Publisher(lambda: src.port, "local/cycling", w, rate, side)
    pub_task = asyncio.create_task(pub.run(), name="peer[publish]")
    sched = await run_schedule(proxy, edge_kill,
                               lambda: cloud.restart(kill=False, down_s=3.0), duration)
    await pub_task

    def count() -> int:
        con = sqlite3.connect(wd / "pm-cloud.db", timeout=5)
        try:
            return int(con.execute("SELECT count(*) FROM readings").fetchone()[0])
        except sqlite3.Error:
            return 0
        finally:
            con.close()

    async def progress() -> int:
        return await asyncio.to_thread(count)

    drained = await _drain(progress, w.readings, drain_s)
    stop.set()
    await disk
    c = proxy.counters()
    side.bytes_up, side.bytes_down = c.bytes_up, c.bytes_down
    await agent.terminate(30)
    await proxy.close()
    await ingest.terminate(20)
    await src.stop()
    await cloud.stop()
    side.cpu_s = agent.cpu_s + src.cpu_s
    con = sqlite3.connect(wd / "pm-cloud.db")
    try:
        stored = con.execute("SELECT ts_ms, sensor, value, received_ms FROM readings").fetchall()
    finally:
        con.close()
    # one message = one timestamp: its ``row`` reading names the row of the others
    row_of = {int(ts): int(v) for ts, s, v, _ in stored if s == "row"}
    side.received = [(row_of.get(int(ts), -1), str(s), int(recv)) for ts, s, _, recv in stored]
    res = side.report(w)
    res.update({"drain_s": drained, "schedule": sched,
                "settings": {"chunk_max_age_s": chunk_age_s, "budget_bytes": 64 * 1024 * 1024}})
    return res


async def run_peer(*, rows: int, rate: float, queue_msgs: int, autosave_s: int,
                   chunk_age_s: float, drain_s: float,
                   workdir: Path | None = None) -> dict[str, Any]:
    w = load_workload(DATA, rows)
    duration = len(w.rows) / rate
    wd = workdir or Path(tempfile.mkdtemp(prefix="pymigrate-peer-"))
    try:
        bridge = await run_bridge(wd, w, rate, duration, queue_msgs=queue_msgs,
                                  queue_bytes=64 * 1024 * 1024, autosave_s=autosave_s,
                                  drain_s=drain_s)
        pm = await run_pymigrate(wd, w, rate, duration, chunk_age_s=chunk_age_s,
                                 drain_s=drain_s)
    finally:
        if workdir is None:
            shutil.rmtree(wd, ignore_errors=True)
    return {"workload": {"csv": DATA.name, "rows": len(w.rows), "readings": w.readings,
                         "rows_per_s": rate, "publish_s": round(duration, 1),
                         "json_payload_bytes": sum(len(w.payload(i, 1_767_225_600_000))
                                                   for i in range(len(w.rows)))},
            "mosquitto_bridge": bridge, "pymigrate": pm,
            "telegraf_style": telegraf_bytes(w)}


def main(argv: list[str] | None = None) -> int:
    from bench.common import emit
    from pymigrate.logsetup import setup_logging

    p = argparse.ArgumentParser(prog="python -m bench peer-bridge",
                                description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=2400, help="CSV rows replayed (5 readings each)")
    p.add_argument("--rate", type=float, default=30.0, help="rows per second")
    p.add_argument("--queue-msgs", type=int, default=1000,
                   help="bridge max_queued_messages (Mosquitto's documented default)")
    p.add_argument("--autosave-s", type=int, default=60, help="edge autosave_interval")
    p.add_argument("--chunk-age-s", type=float, default=2.0, help="agent chunk_max_age_s")
    p.add_argument("--drain-s", type=float, default=60.0)
    a = p.parse_args(argv)
    setup_logging("console", "warning", stream=sys.stderr)
    res = asyncio.run(run_peer(rows=a.rows, rate=a.rate, queue_msgs=a.queue_msgs,
                               autosave_s=a.autosave_s, chunk_age_s=a.chunk_age_s,
                               drain_s=a.drain_s))
    emit("peer-bridge", vars(a), res)
    return 0
