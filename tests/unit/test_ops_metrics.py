"""The agent's Prometheus collector and health document, read from stage counters."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from agent.buffer.types import BufferStats
from agent.config import parse_agent_config
from agent.metrics import HttpEndpoint, health, make_registry
from agent.status import parse_metrics
from agent.supervisor import Agent
from pymigrate.clock import VirtualClock
from tests.unit.fakes_uplink import FakeUplink

P = "pymigrate_agent_"


@pytest.fixture
def agent(tmp_path: Path) -> Agent:
    clock = VirtualClock()
    return Agent(parse_agent_config({"device": {"id": "m-dev", "data_dir": str(tmp_path)}}),
                 clock=clock, uplinks=[FakeUplink(clock, name="mqtt")])


def _scrape(agent: Agent) -> dict[str, Any]:
    return parse_metrics(generate_latest(make_registry(agent, process=False)).decode())


def test_collector_maps_stage_counters(agent: Agent, monkeypatch: pytest.MonkeyPatch) -> None:
    now = agent.clock.time_ms()
    stats = BufferStats(bytes_on_disk=4096, payload_bytes=1000, chunks_pending=3,
                        readings_pending={"critical": 1, "low": 40}, oldest_ts_ms=now - 90_000,
                        evicted={"budget:low": 2, "retention:normal": 1}, evicted_readings=1200,
                        quarantined=1, commits=7, in_flight=1)
    monkeypatch.setattr(agent.buffer, "stats", lambda: stats)
    up = agent.uploader.stats()
    up.update(batches_sent=9, batches_acked=7, batches_failed=2, readings_acked=700,
              attempts={1: 6, 3: 1, 12: 2, 15: 1}, rtt_ewma_s=0.05, throughput_bps=2048.0,
              dead_letters={"expired": 1},
              uplinks={"mqtt": {"breaker": "open", "sent": 9, "acked": 7, "transitions": {}},
                       "coap": {"breaker": "half_open"}})
    monkeypatch.setattr(agent.uploader, "stats", lambda: up)
    agent.ingest.counts.update(received=1000, accepted=990, duplicates_dropped=4)
    agent.validator.reject("nan")
    agent.validator.reject("nan")
    agent.validator.reject("timestamp_future")
    m = _scrape(agent)
    assert m[P + "readings_received_total"] == 1000
    assert m[P + "readings_accepted_total"] == 990
    assert m[P + "readings_rejected_total"] == {"nan": 2, "timestamp_future": 1}
    assert m[P + "chunks_evicted_total"] == {"low,budget": 2, "normal,retention": 1}
    assert m[P + "readings_evicted_total"] == 1200
    assert m[P + "buffer_bytes"] == 4096
    assert m[P + "buffer_oldest_data_age_seconds"] == pytest.approx(90.0)
    assert m[P + "buffer_readings_pending"] == {"critical": 1, "low": 40}
    assert m[P + "batches_acked_total"] == 7 and m[P + "batches_failed_total"] == 2
    assert m[P + "batch_attempts_total"] == {"1": 6, "3": 1, "10+": 3}  # bounded labels
    assert m[P + "breaker_state"] == {"mqtt": 2, "coap": 1}
    assert m[P + "uplink_events_total"] == {"acked,mqtt": 7, "sent,mqtt": 9}
    assert m[P + "rtt_seconds"] == 0.05 and m[P + "throughput_bytes_per_second"] == 2048
    assert m[P + "dead_letters_total"] == {"expired": 1}
    assert m[P + "clock_synced"] == 0 and m[P + "aggregation_ratio"] == 0
    assert m[P + "info"] == {"m-dev,0.1.0": 1}
    doc = health(agent)
    assert doc["status"] == "starting" and doc["healthy"] is False
    assert doc["oldest_data_age_s"] == pytest.approx(90.0)
    assert doc["backlog"]["readings"] == 41
    assert doc["counts"] == {"accepted": 990, "rejected": 3, "evicted": 3, "delivered": 700}


def test_health_states(agent: Agent, monkeypatch: pytest.MonkeyPatch) -> None:
    alive = {"ingest": True, "uploader": True}
    monkeypatch.setattr(agent, "stages_alive", lambda: alive)
    agent.started.set()
    assert health(agent)["status"] == "ok"
    up = agent.uploader.stats()
    up["uplinks"] = {"mqtt": {"breaker": "open"}}
    monkeypatch.setattr(agent.uploader, "stats", lambda: up)
    assert health(agent)["status"] == "degraded"  # alive and buffering: still healthy
    assert health(agent)["healthy"] is True
    alive["uploader"] = False
    assert health(agent)["status"] == "failing"
    agent.request_stop()
    assert health(agent)["status"] == "stopping"


async def test_endpoint_survives_a_failing_route_and_rebind_restores() -> None:
    def boom() -> tuple[int, str, bytes]:
        raise RuntimeError("collector bug")

    ep = HttpEndpoint({"/boom": boom}, "127.0.0.1", 0)
    await ep.start()
    try:
        r, w = await asyncio.open_connection("127.0.0.1", ep.port)
        w.write(b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n")
        await w.drain()
        assert (await r.read()).startswith(b"HTTP/1.1 500")
        w.close()
        port = ep.port
        import socket

        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            with pytest.raises(OSError):
                await ep.rebind("127.0.0.1", busy.getsockname()[1])
        assert ep.port == port  # the old binding is back
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"HEAD / HTTP/1.1\r\n\r\n")
        await w.drain()
        head = await r.read()
        assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")
        w.close()
    finally:
        await ep.close()
