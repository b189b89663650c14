"""The MQTT source against the real Mosquitto: JSON and SenML payloads reach the store;
malformed payloads are rejected with a counted reason; QoS 1 acks follow acceptance."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import aiomqtt
import pytest

from pymigrate.senml import to_senml_json
from pymigrate.types import Reading
from tests.unit.test_agent_pipeline import run_agent

pytestmark = pytest.mark.integration


async def test_mqtt_source_end_to_end(tmp_path: Path, mosquitto: tuple[str, int]) -> None:
    host, port = mosquitto
    prefix = f"pmtest/{uuid.uuid4().hex[:8]}"
    overrides = {"sources": [{"type": "mqtt", "host": host, "port": port,
                              "topics": [f"{prefix}/#"], "qos": 1,
                              "client_id": f"src-{uuid.uuid4().hex[:8]}"}]}
    now = time.time_ns() // 1_000_000
    async with run_agent(tmp_path, overrides) as (agent, _, _):
        src = agent.sources[0]
        await asyncio.wait_for(src.connected.wait(), 10)  # type: ignore[attr-defined]
        async with aiomqtt.Client(host, port) as pub:
            for i in range(20):
                await pub.publish(f"{prefix}/node/temp", f'{{"value": {i}, "ts": {now + i}}}',
                                  qos=1)
            await pub.publish(f"{prefix}/node/x", to_senml_json(
                [Reading("x", "hum", now, 55.5)]), qos=1)
            await pub.publish(f"{prefix}/node/bad", b"{broken", qos=1)
        for _ in range(100):
            if agent.ingest.counts["accepted"] >= 21:
                break
            await asyncio.sleep(0.05)
    assert agent.ingest.counts["accepted"] == 21
    assert agent.validator.rejected["malformed_json"] == 1
    from cloud.stores import SqliteStore

    st = SqliteStore(tmp_path / "cloud.db")
    await st.open()
    try:
        temps = await st.query("dev-1", "temp")
        hums = await st.query("dev-1", "hum")
    finally:
        await st.close()
    assert sorted(r.value for r in temps) == [float(i) for i in range(20)]
    assert [r.value for r in hums] == [55.5]


async def test_mqtt_source_reconnects_when_broker_unreachable(tmp_path: Path) -> None:
    from tests.conftest import free_port

    overrides = {"sources": [{"type": "mqtt", "host": "127.0.0.1", "port": free_port()}]}
    async with run_agent(tmp_path, overrides) as (agent, _, _):
        await asyncio.sleep(0.3)
        assert not agent.sources[0].connected.is_set()  # type: ignore[attr-defined]


async def test_poison_messages_are_counted_acked_and_do_not_stop_the_agent(
        tmp_path: Path, mosquitto: tuple[str, int]) -> None:
    """Issue 16 item 7: 100,000 nested lists, a 17 MB JSON list, plain text and wrong types
    on a QoS 1 source: each refused with its reason and acknowledged (not redelivered after a
    restart), the agent stays up, memory does not keep the big payload, later readings land."""
    import psutil

    host, port = mosquitto
    prefix = f"pmtest/{uuid.uuid4().hex[:8]}"
    client_id = f"src-{uuid.uuid4().hex[:8]}"
    overrides = {"sources": [{"type": "mqtt", "host": host, "port": port, "qos": 1,
                              "topics": [f"{prefix}/#"], "client_id": client_id}]}
    poison = {
        "deep": b"[" * 100_000 + b"]" * 100_000,
        "huge": b"[" + b"21.5," * (17 * 1024 * 1024 // 5) + b"1]",
        "text": b"temperature is 21.5",
        "when": b'{"value": 1, "ts": "yesterday"}',
        "prio": b'{"value": 1, "priority": "urgent"}',
        "utf8": b'{"sensor": "\xff\xfe", "value": 1}',
        "cbor": b"\x81" * 100_000 + b"\x01",
    }
    now = time.time_ns() // 1_000_000
    rss = psutil.Process().memory_info().rss
    async with run_agent(tmp_path, overrides) as (agent, _, _):
        src = agent.sources[0]
        await asyncio.wait_for(src.connected.wait(), 10)  # type: ignore[attr-defined]
        async with aiomqtt.Client(host, port) as pub:
            for name, payload in poison.items():
                await pub.publish(f"{prefix}/node/{name}", payload, qos=1)
            for i in range(5):
                await pub.publish(f"{prefix}/node/temp", f'{{"value": {i}, "ts": {now + i}}}',
                                  qos=1)
        for _ in range(200):
            if agent.ingest.counts["accepted"] >= 5:
                break
            await asyncio.sleep(0.05)
        assert agent.ingest.counts["accepted"] == 5
        assert all(agent.stages_alive().values())
        grown = psutil.Process().memory_info().rss - rss
    rejected = agent.validator.rejected
    assert rejected["unsupported_shape"] == 1 and rejected["payload_too_large"] == 1
    assert rejected["plain_text"] == 1 and rejected["invalid_timestamp"] == 1
    assert rejected["invalid_priority"] == 1 and rejected["invalid_utf8"] == 1
    assert rejected["senml_malformed"] == 1
    assert grown < 40 * 1024 * 1024, f"RSS grew by {grown / 1e6:.0f} MB"
    # every poison message was acknowledged: the broker has nothing left to redeliver
    async with run_agent(tmp_path / "again", overrides) as (agent2, _, _):
        await asyncio.wait_for(agent2.sources[0].connected.wait(), 10)  # type: ignore[attr-defined]
        await asyncio.sleep(0.5)
        assert agent2.sources[0].messages == 0  # type: ignore[attr-defined]
