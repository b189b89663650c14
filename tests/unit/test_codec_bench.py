"""The compression benchmark runs on a real recording and reports exact round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.compression import gorilla_bits, load_csv, main

DATA = Path(__file__).resolve().parent.parent / "data"


def test_bench_compression_prints_one_json_object(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    src = (DATA / "cycling_1hz.csv").read_text().splitlines()
    small = tmp_path / "cycling_small.csv"
    small.write_text("\n".join(src[:121]) + "\n")
    assert main(["--dataset", str(small), "--chunk-points", "60", "--repeats", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    r = out["results"]
    assert out["params"]["codec"].startswith("tsz")
    assert r["points"] == 600 and r["roundtrip_exact"] is True
    assert 0 < r["bytes_per_point"] < 16
    assert r["reduction_vs_raw16"] == pytest.approx(1 - r["bytes_per_point"] / 16, abs=1e-3)
    assert set(r["peers_bytes_per_point"]) >= {"raw16", "lz4", "zstd", "gorilla", "pcodec",
                                               "jsonl_zstd", "line_protocol_gzip"}
    assert set(r["per_series"]) == {"altitude_m", "power_w", "cadence_rpm", "speed_ms",
                                    "distance_m"}


def test_load_csv_keeps_float_text_and_skips_empty_cells() -> None:
    device, sensors, rs = load_csv(DATA / "midc_2018-10-18_1min.csv")
    assert device == "midc_2018-10-18_1min" and len(sensors) == 15
    assert rs[0].sensor == "direct_normal_wm2" and rs[0].value == -0.411739
    assert any(r.value == 927.9630000000001 for r in rs[:40])
    assert [r.seq for r in rs[:5]] == [1, 2, 3, 4, 5]
    first_row = [r for r in rs if r.ts_ms == rs[0].ts_ms]
    assert len(first_row) == 12  # three cells empty in the first row


def test_gorilla_bit_count() -> None:
    # constant series: 64+64 header bits, 14-bit first delta, 1 bit per later timestamp
    # and 1 bit per repeated value
    assert gorilla_bits([0, 10, 20, 30], [1.0] * 4) == 64 + 64 + 14 + 2 + 3


def test_bench_lossy_mode_reports_bounded_error(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    src = (DATA / "midc_2018-10-18_1min.csv").read_text().splitlines()
    small = tmp_path / "midc_small.csv"
    small.write_text("\n".join(src[:81]) + "\n")
    assert main(["--dataset", str(small), "--chunk-points", "600", "--repeats", "1",
                 "--lossy-resolution", "0.1", "--codec", "tsz-zstd"]) == 0
    r = json.loads(capsys.readouterr().out)["results"]
    assert r["roundtrip_exact"] is False
    assert 0 < r["max_abs_error"] <= 0.05
