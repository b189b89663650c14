"""``pymigrate status``: summary text, metric parsing and exit statuses."""

from __future__ import annotations

import io
from typing import Any

import pytest

from agent.metrics import HttpEndpoint, json_route
from agent.status import main, parse_metrics, summarise
from tests.conftest import free_port

TEXT = """# TYPE pymigrate_agent_readings_accepted_total counter
pymigrate_agent_readings_accepted_total 1234.0
# TYPE pymigrate_agent_readings_rejected_total counter
pymigrate_agent_readings_rejected_total{reason="nan"} 3.0
pymigrate_agent_readings_rejected_total{reason="timestamp_future"} 1.0
# TYPE pymigrate_agent_rtt_seconds gauge
pymigrate_agent_rtt_seconds 0.0125
# TYPE pymigrate_agent_buffer_budget_bytes gauge
pymigrate_agent_buffer_budget_bytes 6.7108864e+07
# TYPE pymigrate_agent_process_resident_memory_bytes gauge
pymigrate_agent_process_resident_memory_bytes 3.3554432e+07
"""

HEALTH: dict[str, Any] = {
    "status": "degraded", "healthy": True, "device": "gw-1", "version": "0.1.0",
    "stages": {"ingest": True, "uploader": True},
    "backlog": {"chunks": 4, "readings": 2400, "bytes": 30000},
    "oldest_data_age_s": 61.5, "breakers": {"mqtt": "open", "coap": "closed"},
    "clock": {"state": "synced", "offset_ms": -12.5}, "runtime": {"framework": "greengrass"},
}


def test_parse_metrics() -> None:
    m = parse_metrics(TEXT)
    assert m["pymigrate_agent_readings_accepted_total"] == 1234
    assert m["pymigrate_agent_readings_rejected_total"] == {"nan": 3, "timestamp_future": 1}


def test_summary_reads_like_a_report() -> None:
    text = summarise(HEALTH, parse_metrics(TEXT))
    assert "gw-1" in text and "status DEGRADED" in text and "under greengrass" in text
    assert "accepted 1234" in text and "rejected 4 (nan: 3, timestamp_future: 1)" in text
    assert "4 chunks, 2400 readings, 29.3 KiB; oldest data 61.5 s" in text
    assert "of 64.0 MiB" in text
    assert "coap: closed  mqtt: open" in text
    assert "rtt 12.5 ms" in text and "offset -12.5 ms" in text
    assert "memory RSS 32.0 MiB" in text
    assert "aggreg.   off" in text
    agg = parse_metrics(TEXT + "pymigrate_agent_aggregation_readings_in_total 100.0\n"
                        "pymigrate_agent_aggregation_ratio 0.05\n")
    assert "ratio 0.050 (out/in)" in summarise(HEALTH, agg)


def test_summary_says_blocked_first() -> None:
    health = {**HEALTH, "status": "blocked", "healthy": False,
              "blocked": {"coap": "device_mismatch"}}
    text = summarise(health, parse_metrics(TEXT))
    assert text.splitlines()[2].startswith("BLOCKED   coap: device_mismatch")
    assert "BLOCKED" not in summarise(HEALTH, parse_metrics(TEXT))


def test_unreachable_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--url", f"http://127.0.0.1:{free_port()}", "--timeout", "1"]) == 2
    assert "unreachable" in capsys.readouterr().err


@pytest.mark.parametrize(("doc", "rc"), [(HEALTH, 0), ({**HEALTH, "healthy": False,
                                                        "status": "failing"}, 1),
                                         ({"hello": "world", "healthy": True}, 2)])
async def test_exit_status_follows_health(doc: dict[str, Any], rc: int) -> None:
    import asyncio

    ep = HttpEndpoint({"/health": json_route(lambda: doc),
                       "/metrics": lambda: (200, "text/plain", TEXT.encode())}, "127.0.0.1", 0)
    await ep.start()
    try:
        out = io.StringIO()
        got = await asyncio.to_thread(main, ["--url", f"http://127.0.0.1:{ep.port}/"], out=out)
        assert got == rc
        if rc == 1:
            assert "status FAILING" in out.getvalue()
        quiet = io.StringIO()
        assert await asyncio.to_thread(main, ["--url", f"http://127.0.0.1:{ep.port}", "-q"],
                                       out=quiet) == rc
        assert quiet.getvalue() == ""
    finally:
        await ep.close()
