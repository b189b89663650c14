"""``python -m bench ingest`` smoke run (SQLite only, small): one JSON object whose runs
stored every reading exactly once."""

from __future__ import annotations

import json

import pytest

from bench import ingest


def test_bench_ingest_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    rc = ingest.main(["--readings", "8000", "--batch", "1000", "--devices", "4",
                      "--stores", "sqlite", "--replicas", "1,2"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    runs = doc["results"]["sqlite"]["runs"]
    assert [(r["replicas"], r["race"]) for r in runs] == [(1, False), (2, False), (2, True)]
    assert all(r["stored_exactly_once"] and r["readings"] == 8000 for r in runs)
    assert runs[2]["acks"] == {"ok": 8, "duplicate": 8}
    assert all(r["readings_per_s"] > 0 and r["cpu_us_per_reading"] > 0 for r in runs)
