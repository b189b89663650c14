"""The chaos run's fault kinds, each bounded in time and count, loopback only.

Every fault takes the run (:class:`bench.chaos.ChaosRun`) and returns a small dict of what
it did and saw (it lands in the result's ``fault_results``), or raises :class:`Skip` with
the reason it cannot run here (not root for a tmpfs, no Mosquitto on 1883, no RabbitMQ).
Durations scale with the run's ``pace`` (the test suite runs at a faster pace).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench._chaos_audit import key
from bench._chaos_env import port_open, proc_rss_bytes, wait_until

if TYPE_CHECKING:
    from bench.chaos import ChaosRun, Device

EIGHT_DAYS_MS = 8 * 86_400_000


class Skip(Exception):
    """This fault cannot run in this environment (the reason says why)."""


async def agent_kill9(run: ChaosRun, r: random.Random) -> dict[str, Any]:
    d = r.choice(run.active_devices())
    async with d.lock:
        await d.proc.kill9()
        await asyncio.sleep(r.uniform(0.5, 3.0) * run.pace)
        d.start()
    return {"device": d.name}


async def broker_restart(run: ChaosRun, r: random.Random) -> dict[str, Any]:
    hard = r.random() < 0.5
    await run.up.restart(kill=hard, down_s=r.uniform(1.0, 4.0) * run.pace)
    return {"signal": "SIGKILL" if hard else "SIGTERM"}


async def ingest_restart(run: ChaosRun, r: random.Random) -> dict[str, Any]:
    hard = r.random() < 0.5
    async with run.cloud_lock:
        if hard:
            await run.cloud.kill9()
        else:
            await run.cloud.terminate(20)
        await asyncio.sleep(r.uniform(1.0, 3.0) * run.pace)
        run.cloud.start()
    return {"signal": "SIGKILL" if hard else "SIGTERM"}


async def link_cut(run: ChaosRun, r: random.Random) -> dict[str, Any]:
    d = r.choice(run.proxied_devices())
    mode = r.choice(("reset", "blackhole"))
    run.proxy.cut(d.name, mode=mode)
    await asyncio.sleep(r.uniform(3.0, 10.0) * run.pace)
    run.proxy.restore(d.name)
    return {"device": d.name, "mode": mode}


async def link_throttle(run: ChaosRun, r: random.Random) -> dict[str, Any]:
    d = r.choice(run.proxied_devices())
    run.proxy.set(d.name, bandwidth_bps=r.uniform(2000, 8000),
                  latency_ms=r.uniform(100, 300), jitter_ms=50)
    await asyncio.sleep(r.uniform(5.0, 15.0) * run.pace)
    run.proxy.set(d.name, bandwidth_bps=0, latency_ms=0, jitter_ms=0)
    return {"device": d.name}


async def clock_jump_8d(run: ChaosRun, r: random.Random) -> dict[str, Any]:
    """While a device is offline (its link blackholed, so data is buffered across the
    jump), restart its agent with the wall clock 8 days off (``PYMIGRATE_CLOCK_OFFSET_MS``,
    the project's clock hook), let it run, then restart it on the right time (a jump back),
    then reconnect it."""
    d = r.choice(run.proxied_devices())
    sign = -1 if run.faults["clock_jump_8d"] % 2 else 1  # forward first, then backward
    async with d.lock:
        run.proxy.cut(d.name, mode="blackhole")
        await asyncio.sleep(r.uniform(2.0, 4.0) * run.pace)
        d.offset_ms = sign * EIGHT_DAYS_MS
        await d.proc.terminate(20)
        d.start()
        await asyncio.sleep(r.uniform(4.0, 8.0) * run.pace)
        d.offset_ms = 0
        await d.proc.terminate(20)
        d.start()
        run.proxy.restore(d.name)
    return {"device": d.name, "offset_ms": sign * EIGHT_DAYS_MS}


async def quota_fill(run: ChaosRun, r: random.Random) -> dict[str, Any]:
    """Cut a small-budget device's link and burst more LOW readings than its budget."""
    small = [x for x in run.proxied_devices() if x.small]
    if not small:
        raise Skip("no small-budget device (needs --devices >= 1)")
    d = r.choice(small)
    run.proxy.cut(d.name, mode="blackhole")
    await run.burst(d, run.burst_n, "bulk")
    await asyncio.sleep(r.uniform(4.0, 8.0) * run.pace)
    run.proxy.restore(d.name)
    return {"device": d.name, "readings": run.burst_n}


async def offline_kill9_cycles(run: ChaosRun, r: random.Random) -> dict[str, Any]:
    """Five ``kill -9`` cycles of an offline agent that must evict: the small-budget
    device's link is blackholed, and five times a LOW burst goes in and the agent is
    SIGKILLed a moment later and restarted; then the link comes back (issue 16's test)."""
    small = [x for x in run.proxied_devices() if x.small]
    if not small:
        raise Skip("no small-budget device")
    d = small[0]
    async with d.lock:
        run.proxy.cut(d.name, mode="blackhole")
        for _ in range(5):
            await run.burst(d, run.burst_n // 5, "bulk")
            await asyncio.sleep(r.uniform(1.0, 2.0))
            await d.proc.kill9()
            await asyncio.sleep(0.3)
            d.start()
            await asyncio.sleep(1.0)
        run.proxy.restore(d.name)
    return {"device": d.name, "cycles": 5, "readings": 5 * (run.burst_n // 5)}


async def buffer_corrupt(run: ChaosRun, r: random.Random) -> dict[str, Any]:
    """Cut the link, SIGKILL the agent, flip a byte in its oldest chunk, restart."""
    big = [x for x in run.proxied_devices() if not x.small and not x.tmpfs]
    d = r.choice(big or run.proxied_devices())
    async with d.lock:
        run.proxy.cut(d.name, mode="reset")
        await asyncio.sleep(r.uniform(2.5, 4.0) * run.pace)
        # a sealed chunk must be there to damage (bounded wait)
        await wait_until(lambda: _has_chunk(d.buffer_path), 10, step=0.25)
        await d.proc.kill9()
        hit = await asyncio.to_thread(_corrupt, run, d)
        d.start()
        await asyncio.sleep(1.0)
        run.proxy.restore(d.name)
    return {"device": d.name, "chunk": hit}


def _has_chunk(db: Path) -> bool:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2)
        try:
            return con.execute("SELECT 1 FROM chunks LIMIT 1").fetchone() is not None
        finally:
            con.close()
    except sqlite3.Error:
        return False


def _corrupt(run: ChaosRun, d: Device) -> int | None:
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
            run.truth.corrupted.add(key(d.id, rd.sensor, rd.value))
        payload = bytearray(row[9])
        payload[len(payload) // 2] ^= 0x5A
        con.execute("UPDATE chunks SET payload = ? WHERE id = ?", (bytes(payload), row[0]))
        con.commit()
        return int(row[0])
    finally:
        con.close()


async def disk_full(run: ChaosRun, r: random.Random) -> dict[str, Any]:
    """A real full filesystem: the device's data dir is a small tmpfs (mounted by the
    harness); with its link cut, another file fills that filesystem to the last byte
    while readings keep coming (plus a burst), for a few seconds; then the file is
    removed and the link restored. The agent must stay up and lose nothing unrecorded."""
    d = next((x for x in run.devices if x.tmpfs), None)
    if d is None:
        raise Skip(run.tmpfs_skip or "no tmpfs device")
    ballast = d.data_dir / "ballast.bin"
    async with d.lock:
        run.proxy.cut(d.name, mode="blackhole")
        # let a batch go into the blackhole first: its send times out while the disk is
        # full (the agent's uplink timeout is 5 s), so "give it back" must write then too
        await asyncio.sleep(1.5)
        filled = await asyncio.to_thread(_fill, ballast)
        free_full = _free_bytes(d.data_dir)
        await run.burst(d, run.burst_n // 4, "bulk")
        await asyncio.sleep(max(7.0, r.uniform(3.0, 8.0) * run.pace))
        full_events = d.log_count("buffer.append_failed")
        alive = d.proc.alive
        ballast.unlink(missing_ok=True)
        await asyncio.sleep(1.0)
        run.proxy.restore(d.name)
        if not alive:  # a finding (the audit shows what it cost); bring it back
            d.start()
    return {"device": d.name, "tmpfs_bytes": run.tmpfs_bytes, "ballast_bytes": filled,
            "free_bytes_while_full": free_full, "burst": run.burst_n // 4,
            "append_failed_events": full_events, "agent_alive_while_full": alive}


def _fill(path: Path) -> int:
    """Write ``path`` until the filesystem has no byte left (ENOSPC); returns its size."""
    n = 0
    block = b"\0" * 65536
    with open(path, "wb", buffering=0) as f:
        for size in (65536, 4096, 512, 1):
            while True:
                try:
                    n += f.write(block[:size])
                except OSError:
                    break
    return n


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return int(st.f_bavail * st.f_frsize)


async def poison(run: ChaosRun, r: random.Random) -> dict[str, Any]:
    """Deeply nested JSON and a huge payload on the poison device's second MQTT source (the
    real Mosquitto on 1883, a topic prefix unique to this run), then ordinary readings on
    the same topic: the agent must stay up and the readings after the poison must arrive."""
    import aiomqtt

    d = next((x for x in run.devices if x.poison), None)
    if d is None or not port_open(1883):
        raise Skip("no Mosquitto on 127.0.0.1:1883")
    async with d.lock:
        pid = d.proc.proc.pid if d.proc.proc else None
        rss0 = proc_rss_bytes(pid) if pid else 0
        nested = b"[" * run.poison_depth + b"]" * run.poison_depth
        n = max(1, run.poison_kb * 1024 // 3)
        huge = b"[" + b",".join([b"{}"] * n) + b"]"
        topic = f"{d.poison_topic}/data"
        async with aiomqtt.Client("127.0.0.1", 1883,
                                  identifier=f"chaos-poison-{run.run_id}") as c:
            await c.publish(topic, nested, qos=1)
            await c.publish(topic, huge, qos=1)
            items: list[dict[str, Any]] = []
            now = run.now_ms()
            for _ in range(20):
                d.counter += 1
                items.append({"sensor": "after", "value": float(d.counter)})
                k = run.truth_add(d, "after", float(d.counter), "normal", now)
                run.tags.setdefault("poison_after", set()).add(k)
            await c.publish(topic, json.dumps(items).encode(), qos=1)
        await asyncio.sleep(max(3.0, 6.0 * run.pace))
        alive = d.proc.alive and d.proc.proc is not None and d.proc.proc.pid == pid
        rss1 = proc_rss_bytes(pid) if alive and pid else 0
        if not alive:
            # a crash loop on a redelivered message: drop the broker session so the
            # run can go on (the readings after the poison go with it; the audit counts)
            async with aiomqtt.Client("127.0.0.1", 1883, identifier=d.poison_client,
                                      clean_session=True):
                pass
            if d.proc.proc is not None:
                await d.proc.kill9()
            d.start()
    return {"device": d.name, "depth": run.poison_depth, "huge_bytes": len(huge),
            "agent_survived": alive, "rss_before": rss0, "rss_after": rss1}


async def twin_agents(run: ChaosRun, r: random.Random) -> dict[str, Any]:
    """A second agent process with the same device id (a cloned SD card: same config, its
    own data dir) joins the run and keeps publishing to the end; again: it is SIGKILLed
    and restarted."""
    t = run.twin
    if t is None:
        raise Skip("no twin (needs --devices >= 3)")
    async with t.lock:
        if t.active:
            await t.proc.kill9()
            await asyncio.sleep(r.uniform(0.5, 2.0) * run.pace)
            t.start()
            return {"device": t.name, "action": "kill9+restart"}
        t.start()
        ok = await run.wait_subscribed([t], 60)
        t.active = True
    return {"device": t.name, "device_id": t.id, "twin_of": t.twin_of.name if t.twin_of else None,
            "subscribed": ok}


async def cloud_reject(run: ChaosRun, r: random.Random) -> dict[str, Any]:
    """A cloud-side rejection: the ingest is restarted with its AMQP listener checking the
    broker-validated ``user_id`` as channel identity; the AMQP device publishes as
    ``guest``, so every batch is refused ``device_mismatch`` (an identity rejection: the
    agent must keep the data and say ``blocked``). Then the right config comes back."""
    d = next((x for x in run.devices if x.amqp), None)
    if d is None:
        raise Skip(run.amqp_skip or "no AMQP device")
    before = d.log_count("uploader.blocked")
    async with run.cloud_lock:
        await run.cloud.terminate(20)
        run.write_cloud_config(identity="user_id")
        run.cloud.start()
        blocked = await wait_until(lambda: d.log_count("uploader.blocked") > before,
                                   30 * max(run.pace, 0.5), step=0.25)
        await asyncio.sleep(r.uniform(2.0, 4.0) * run.pace)
        await run.cloud.terminate(20)
        run.write_cloud_config(identity="routing_key")
        run.cloud.start()
    return {"device": d.name, "blocked_seen": blocked}


async def blackhole_reset_kill9(run: ChaosRun, r: random.Random) -> dict[str, Any]:
    """Half-open link (nothing forwarded, nothing closed), then the connections reset,
    then ``kill -9`` of the agent while it is in that state, restart, heal."""
    d = r.choice([x for x in run.proxied_devices() if not x.tmpfs] or run.proxied_devices())
    async with d.lock:
        run.proxy.cut(d.name, mode="blackhole")
        await asyncio.sleep(r.uniform(2.0, 5.0) * run.pace)
        run.proxy.cut(d.name, mode="reset")
        await asyncio.sleep(0.5)
        await d.proc.kill9()
        await asyncio.sleep(r.uniform(0.5, 2.0) * run.pace)
        d.start()
        await asyncio.sleep(1.0)
        run.proxy.restore(d.name)
    return {"device": d.name}


FAULTS = {f.__name__: f for f in (
    agent_kill9, broker_restart, ingest_restart, link_cut, link_throttle, clock_jump_8d,
    quota_fill, offline_kill9_cycles, buffer_corrupt, disk_full, poison, twin_agents, cloud_reject,
    blackhole_reset_kill9)}
