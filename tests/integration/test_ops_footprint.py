"""``python -m bench footprint`` runs end to end (small pre-fill) and reports real figures."""

from __future__ import annotations

import json

import pytest

from bench.footprint import main

pytestmark = pytest.mark.integration


def test_footprint_bench_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--seconds", "600", "--settle", "0.3", "--repeat", "1"]) == 0
    r = json.loads(capsys.readouterr().out)["results"]
    assert r["prefill_readings"] == 600 * 10
    assert 0 < r["start_to_ready_s_median"] < 30
    for key in ("rss_after_start_bytes", "rss_day_buffered_bytes",
                "rss_day_buffered_udp6_only_bytes"):
        assert 5_000_000 < r[key] < 1_000_000_000, key
    assert isinstance(r["rss_target_met"], bool)
