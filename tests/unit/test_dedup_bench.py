"""The dedup benchmark runs end to end on a small fleet and meets its targets."""

from __future__ import annotations

import json

import pytest

from bench import dedup


def test_small_simulation_meets_targets(capsys: pytest.CaptureFixture[str]) -> None:
    rc = dedup.main(["--devices", "12", "--sensors", "3", "--hours", "3",
                     "--restarts-per-day", "12", "--seed", "5"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    res = out["results"]
    assert out["benchmark"] == "dedup" and out["params"]["devices"] == 12
    assert res["false_drops"] == 0
    assert res["duplicates_stored"] == 0
    assert res["precision"] >= 0.9999 and res["recall"] >= 0.9999
    assert res["time_error_ms_p99"] < 100
    assert res["anchored_readings"] > 0  # the RTC-reset device
    c = res["counters"]
    assert c["agent_restarts"] > 0 and c["retransmissions"] > 0 and c["gateway_copies"] > 0
    assert res["removed_by"]["seq_idempotency"] > 0 and res["removed_by"]["edge_window"] > 0
    assert 0 < res["edge_window_bytes_per_entry"] < 64
