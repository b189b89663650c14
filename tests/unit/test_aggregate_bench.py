"""The aggregation benchmark runs end to end on a small recording and checks itself."""

from __future__ import annotations

import json
import math
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bench import aggregation


def _csv(path: Path) -> Path:
    rng = random.Random(3)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    lines = ["timestamp,air_temp_c,pressure_mb"]
    temp = 10.0
    for i in range(2 * 3600):  # 2 h at 1 Hz
        temp += rng.gauss(0, 0.02)
        ts = (t0 + timedelta(seconds=i)).strftime("%Y-%m-%dT%H:%M:%SZ")
        p = "" if i % 97 == 0 else f"{927 + math.sin(i / 500):.3f}"
        lines.append(f"{ts},{temp:.2f},{p}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bench_prints_exact_statistics_and_bounded_reconstruction(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = _csv(tmp_path / "station.csv")
    assert aggregation.main(["--dataset", str(csv)]) == 0
    doc = json.loads(capsys.readouterr().out)
    ds = doc["results"]["datasets"][0]
    assert ds["raw_points"] == 2 * 7200 - 75
    w = ds["rule_sets"]["weather_10min"]
    assert w["exact_statistics"] is True
    assert w["max_abs_error"]["count"] == 0 and w["max_abs_error"]["min"] == 0
    assert w["windows_checked"] == 2 * 12
    sums = ds["rule_sets"]["weather_1h_sum"]
    assert sums["exact_statistics"] and sums["max_rel_error"]["avg_from_sum_count"] <= 1e-9
    full = ds["rule_sets"]["weather_1h_full"]
    assert full["max_abs_error"]["sum"] == 0.0 and full["max_rel_error"]["stddev"] <= 1e-9
    # 600 readings per window become 4 aggregates: well past the 75% requirement
    assert w["bandwidth_reduction"]["vs_raw_same_codec"] > 0.75
    assert w["bandwidth_reduction"]["vs_raw16"] > 0.9
    db = ds["rule_sets"]["deadband"]
    assert db["deadband_bound_respected"] is True
    assert db["reconstruction"]["max_error_pct_of_range"] <= 1.0 + 1e-9
    assert ds["rule_sets"]["lttb_1h"]["readings_out"] == 2 * 2 * 6


def test_bench_without_data_is_a_usage_error(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aggregation, "DEFAULT_DIRS", (tmp_path,))
    with pytest.raises(SystemExit):
        aggregation.main([])
