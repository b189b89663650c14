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
