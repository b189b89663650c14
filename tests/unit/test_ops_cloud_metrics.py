"""Cloud ingest and coordinator metrics read the services' own counters."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from prometheus_client import generate_latest

from agent.status import parse_metrics
from cloud.metrics import cloud_endpoint, cloud_registry, coordinator_endpoint


class _Service:
    def __init__(self) -> None:
        import collections

        self.counters: collections.Counter[str] = collections.Counter(
            {"batches_received": 10, "batches_ok": 7, "batches_duplicate": 1,
             "rejected:checksum": 2, "throttled": 1, "readings_written": 700,
             "readings_duplicate": 5, "novel_counter": 3})


def test_ingest_collector() -> None:
    m = parse_metrics(generate_latest(cloud_registry(_Service(), process=False)).decode())  # type: ignore[arg-type]
    p = "pymigrate_cloud_"
    assert m[p + "batches_received_total"] == 10
    assert m[p + "batches_acked_total"] == {"ok": 7, "duplicate": 1}
    assert m[p + "batches_rejected_total"] == {"checksum": 2}
    assert m[p + "batches_throttled_total"] == 1
    assert m[p + "readings_written_total"] == 700
    assert m[p + "store_errors_total"] == 0
    assert m[p + "events_total"] == {"novel_counter": 3}  # nothing is dropped


async def _get(port: int, path: str) -> tuple[int, bytes]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await w.drain()
    data = await r.read()
    w.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_cloud_endpoint_health() -> None:
    class _Store:
        name = "sqlite"

    class _Server:
        name = "mqtt"

    class _App:
        service = _Service()
        store = _Store()
        servers = [_Server()]
        ready = asyncio.Event()
        completeness = {"d1": {"unexplained": 2, "stored": 5, "conflicts": 0, "max_seq": 9,
                               "ranges_forgotten": 0, "state_ranges": 0,
                               "gaps": {"evicted": 2}}}
        completeness_at_ms = 1_000

    app: Any = _App()
    ep = cloud_endpoint(app, port=0)
    await ep.start()
    try:
        code, body = await _get(ep.port, "/health")
        assert code == 503 and json.loads(body)["status"] == "starting"
        app.ready.set()
        code, body = await _get(ep.port, "/health")
        doc = json.loads(body)
        assert code == 200 and doc["listeners"] == ["mqtt"] and doc["store"] == "sqlite"
        code, body = await _get(ep.port, "/metrics")
        assert code == 200 and b"pymigrate_cloud_readings_written_total 700.0" in body
        assert b'pymigrate_cloud_completeness_unexplained{device="d1"} 2.0' in body
    finally:
        await ep.close()


async def test_coordinator_endpoint_refreshes_gauges() -> None:
    from cloud.fleet.metrics import FleetMetrics

    class _Coord:
        metrics = FleetMetrics()
        calls = 0

        def status(self) -> dict[str, Any]:
            self.calls += 1
            self.metrics.online.set(42)
            return {"fleet": {"online": 42}, "rollouts": [{}]}

    coord: Any = _Coord()
    ep = coordinator_endpoint(coord, port=0)
    await ep.start()
    try:
        code, body = await _get(ep.port, "/metrics")
        assert code == 200 and b"pymigrate_fleet_online_devices 42.0" in body
        code, body = await _get(ep.port, "/health")
        assert code == 200 and json.loads(body)["rollouts"] == 1
        assert coord.calls == 2
    finally:
        await ep.close()
