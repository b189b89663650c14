"""A QoS 1 MQTT source through repeated ``kill -9`` stores every reading exactly once.

Real processes and a real broker: Mosquitto on 127.0.0.1:1883 (a unique topic prefix and
client id per run), ``pymigrate cloud`` (CoAP on a free port into SQLite) and
``pymigrate agent`` with an ``mqtt`` source (QoS 1, persistent session: the broker keeps
what the agent has not PUBACKed and delivers it again to the next process). A publisher
thread in the test sends a known set of readings, one QoS 1 message each, while the agent
is SIGKILLed at random moments and restarted; then the agent drains (SIGTERM).

A message the agent committed but had not yet acknowledged when it died comes again to
the next process; without the edge dedup window persisted in the buffer it would get new
sequence numbers and be stored twice. A kill at a random moment rarely lands between a
commit and its PUBACK (well under a millisecond), so before each kill the test's TCP
relay between agent and broker holds the agent's outgoing bytes for a moment (a congested
uplink: PUBACKs queued, not yet at the broker) and drops them when the process dies. The
broker then redelivers up to its in-flight window (20 by default) of messages the agent
had already committed: the case the persisted window exists for. The assertions are on
what the cloud holds: each published reading once with its value, and ``pymigrate cloud
completeness --json`` with nothing unexplained and no duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.conftest import free_port
from tests.support.agent_cloud import agent_cloud_toml
from tests.support.agent_cloud import spawn as _spawn
from tests.support.agent_cloud import wait_for as _wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PY = sys.executable
DEVICE = "mqttk9-dev"
N_READINGS = 1200
SENSORS = 6
PUBLISH_RATE = 100.0  # messages/s: the broker's offline queue (1000 by default) never fills
KILLS = 4
TS0 = 1_767_225_600_000


def _config(tmp: Path, port: int, relay_port: int, prefix: str, client_id: str) -> Path:
    cfg = tmp / "agent.toml"
    cfg.write_text(agent_cloud_toml(
        tmp, port, device=DEVICE, data_dir="var",
        source=(f'type = "mqtt"\nhost = "127.0.0.1"\nport = {relay_port}\n'
                f'topics = ["{prefix}/#"]\nqos = 1\nclient_id = "{client_id}"'),
        retry="backoff_cap_s = 0.5", pipeline="drain_timeout_s = 15.0"))
    return cfg


def _expected() -> dict[tuple[str, int], float]:
    """(sensor, device timestamp) -> value of every reading the publisher sends."""
    return {(f"s{i % SENSORS}", TS0 + i * 1000): float(i) for i in range(N_READINGS)}


def _client(client_id: str, *, clean: bool) -> paho.Client:
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                    clean_session=clean, protocol=paho.MQTTv311)
    c.connect("127.0.0.1", 1883, keepalive=30)
    c.loop_start()
    return c


def _open_session(client_id: str, topic: str) -> None:
    """Create the agent's persistent session before anything is published, so the broker
    queues from the first message on even while no agent process is connected."""
    c = _client(client_id, clean=False)
    try:
        done = threading.Event()
        c.on_subscribe = lambda *a: done.set()
        r, _ = c.subscribe(topic, qos=1)
        assert r == paho.MQTT_ERR_SUCCESS
        assert done.wait(5), "no SUBACK from the broker"
    finally:
        c.disconnect()
        c.loop_stop()


def _drop_session(client_id: str) -> None:
    """A clean connect with the agent's client id ends its persistent session on the
    broker (nothing of this run stays queued there)."""
    with contextlib.suppress(OSError):
        c = _client(client_id, clean=True)
        time.sleep(0.2)
        c.disconnect()
        c.loop_stop()


class Publisher(threading.Thread):
    """Publishes every expected reading once at QoS 1 (paho retries until PUBACK)."""

    def __init__(self, prefix: str) -> None:
        super().__init__(name="test-publisher", daemon=True)
        self.prefix = prefix
        self.sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            c = _client(f"pub-{uuid.uuid4().hex[:8]}", clean=True)
            try:
                infos = []
                t0 = time.monotonic()
                for i, ((sensor, ts), value) in enumerate(_expected().items()):
                    payload = json.dumps({"sensor": sensor, "value": value, "ts": ts})
                    infos.append(c.publish(f"{self.prefix}/node/{sensor}", payload, qos=1))
                    self.sent += 1
                    delay = t0 + (i + 1) / PUBLISH_RATE - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                for info in infos:
                    info.wait_for_publish(10)
                    assert info.is_published()
            finally:
                c.disconnect()
                c.loop_stop()
        except BaseException as exc:  # reported by the test
            self.error = exc


class HoldingRelay(threading.Thread):
    """TCP relay agent <-> broker; :meth:`hold` keeps the agent's outgoing bytes back
    (they are dropped if the agent's connection closes first), :meth:`release` lets
    them through."""

    def __init__(self, upstream_port: int) -> None:
        super().__init__(name="test-relay", daemon=True)
        self.upstream_port = upstream_port
        self.port = 0
        self.held_bytes = 0
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._open: asyncio.Event | None = None
        self._done: asyncio.Event | None = None

    def run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self._done = asyncio.Event()
        server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._done.wait()

    async def _conn(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            cw.close()
            return

        async def up() -> None:  # agent -> broker; held bytes die with the agent
            assert self._open is not None
            held = bytearray()
            read = asyncio.ensure_future(cr.read(65536))
            try:
                while True:
                    opener = asyncio.ensure_future(self._open.wait())
                    waits = {read} if self._open.is_set() else {read, opener}
                    done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                    opener.cancel()
                    if read in done:
                        data = read.result()
                        if not data:
                            return  # the agent is gone: what it held back never arrives
                        held += data
                        read = asyncio.ensure_future(cr.read(65536))
                        if not self._open.is_set():
                            self.held_bytes += len(data)
                    if not self._open.is_set():
                        continue
                    if held:
                        uw.write(bytes(held))
                        held.clear()
                        await uw.drain()
            finally:
                read.cancel()

        async def down() -> None:
            while data := await ur.read(65536):
                cw.write(data)
                await cw.drain()

        tasks = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
        with contextlib.suppress(Exception):
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for w in (uw, cw):
            w.transport.abort()

    def start_relay(self) -> int:
        self.start()
        assert self._ready.wait(5)
        return self.port

    def hold(self) -> None:
        assert self._open is not None
        self._loop.call_soon_threadsafe(self._open.clear)

    def release(self) -> None:
        assert self._open is not None
        self._loop.call_soon_threadsafe(self._open.set)

    def stop(self) -> None:
        if self._done is not None:
            self._loop.call_soon_threadsafe(self._done.set)
            self.join(5)


def _stored(db: Path) -> list[tuple[str, int, float, int]]:
    con = sqlite3.connect(db)
    try:
        return [(str(s), int(t), float(v), int(q)) for s, t, v, q in con.execute(
            "SELECT sensor, COALESCE(raw_ts_ms, ts_ms), value, seq FROM readings "
            "WHERE device_id = ?", (DEVICE,))]
    finally:
        con.close()


def test_qos1_source_through_repeated_kill9_stores_each_reading_once(
        tmp_path: Path, mosquitto: tuple[str, int]) -> None:
    run = uuid.uuid4().hex[:10]
    prefix = f"pmtest/k9/{run}"
    client_id = f"pm-k9-{run}"
    port = free_port()
    relay = HoldingRelay(1883)
    cfg = _config(tmp_path, port, relay.start_relay(), prefix, client_id)
    cloud_db = tmp_path / "cloud.db"
    buffer_db = tmp_path / "var" / "buffer.db"
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    started = time.monotonic()
    _open_session(client_id, f"{prefix}/#")
    cloud = _spawn("cloud", "--config", str(cfg))
    publisher = Publisher(prefix)
    agents: list[subprocess.Popen[bytes]] = []
    try:
        assert _wait_for(cloud_db.exists, 20), "cloud did not start"
        publisher.start()
        kills = 0
        for _ in range(KILLS):
            agent = _spawn("agent", "--config", str(cfg))
            agents.append(agent)
            if not _wait_for(buffer_db.exists, 20):
                agent.kill()
                raise AssertionError(agent.communicate()[0].decode(errors="replace")[-3000:])
            time.sleep(rng.uniform(1.0, 2.5))  # the process is up and consuming by now
            relay.hold()  # PUBACKs queue up on the way to the broker ...
            time.sleep(rng.uniform(0.2, 0.5))
            agent.send_signal(signal.SIGKILL)  # ... and die with the process
            agent.wait(10)
            relay.release()
            kills += 1
        assert kills == KILLS
        assert relay.held_bytes > 0  # acknowledgements were really lost
        agent = _spawn("agent", "--config", str(cfg))
        agents.append(agent)
        publisher.join(40)
        assert not publisher.is_alive(), "publisher did not finish"
        assert publisher.error is None, repr(publisher.error)
        assert publisher.sent == N_READINGS
        # the last agent takes the broker's queue and uploads it; then drain
        _wait_for(lambda: len({(s, t) for s, t, _, _ in _stored(cloud_db)}) >= N_READINGS,
                  25)
        agent.send_signal(signal.SIGTERM)
        out, _ = agent.communicate(timeout=30)
        assert agent.returncode == 0, out.decode(errors="replace")[-2000:]

        rows = _stored(cloud_db)
        copies = Counter((s, t) for s, t, _, _ in rows)
        expected = _expected()
        missing = sorted(set(expected) - set(copies))
        twice = sorted(k for k, n in copies.items() if n > 1)
        unknown = sorted(set(copies) - set(expected))
        ctx = f"(kill times seeded {seed}; {len(rows)} rows for {N_READINGS} readings)"
        assert missing == [], f"{len(missing)} published readings lost, first {missing[:5]} {ctx}"
        seqs_of = [(k, sorted(q for s, t, _, q in rows if (s, t) == k)) for k in twice[:3]]
        assert twice == [], (f"{len(twice)} readings stored more than once, first "
                             f"{seqs_of} ((sensor, ts), seqs) {ctx}")
        assert unknown == [], f"readings never published were stored: {unknown[:5]}"
        assert all(v == expected[(s, t)] for s, t, v, _ in rows)
        assert len(rows) == N_READINGS

        audit = subprocess.run(
            [PY, "-m", "pymigrate.cli", "cloud", "completeness", "--config", str(cfg),
             "--json"], capture_output=True, timeout=30, check=False)
        report = json.loads(audit.stdout)
        totals = report["totals"]
        assert totals["unexplained"] == 0, report
        assert totals["duplicates"] == 0, report
        assert totals["stored"] == N_READINGS, report
        assert audit.returncode == 0, audit.stderr.decode(errors="replace")[-2000:]
        assert time.monotonic() - started < 60
    finally:
        for a in agents:  # a failed assertion leaves no agent behind
            if a.poll() is None:
                a.kill()
                a.wait(10)
        cloud.send_signal(signal.SIGTERM)
        try:
            cloud.wait(20)
        except subprocess.TimeoutExpired:
            cloud.kill()
        _drop_session(client_id)
        relay.stop()
