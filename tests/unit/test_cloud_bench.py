"""``python -m bench ingest`` smoke run (SQLite only, small): one JSON object whose runs
stored every reading exactly once, checked reading by reading on data with
same-millisecond readings; and the check itself catches a lost, an extra and a twice
stored reading."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import msgspec
import pytest

from bench import ingest
from pymigrate.types import Reading


def test_bench_ingest_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    rc = ingest.main(["--readings", "8000", "--batch", "1000", "--devices", "4",
                      "--stores", "sqlite", "--replicas", "1,2"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["params"]["same_millisecond_share"] == 0.2
    runs = doc["results"]["sqlite"]["runs"]
    assert [(r["replicas"], r["race"]) for r in runs] == [(1, False), (2, False), (2, True)]
    assert all(r["exactly_once"] and r["readings"] == r["stored"] == 8000 for r in runs)
    assert runs[2]["acks"] == {"ok": 8, "duplicate": 8}
    assert all(r["readings_per_s"] > 0 and r["cpu_us_per_reading"] > 0 for r in runs)


def test_exactly_once_check_is_reading_by_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    produced = ingest.make_readings(2, 200)
    assert ingest.same_ms_share(produced) == 0.2

    class Stored:
        def __init__(self, rows: dict[str, list[Reading]]) -> None:
            self.rows = rows

        async def open(self) -> None: ...

        async def close(self) -> None: ...

        async def query(self, dev: str) -> list[Reading]:
            return self.rows[dev]

    def check(rows: dict[str, list[Reading]]) -> dict[str, Any]:
        monkeypatch.setattr(ingest, "_make_store", lambda spec: Stored(rows))
        return asyncio.run(ingest.check_exactly_once({}, produced))

    assert check(produced)["exactly_once"] is True
    a, b = sorted(produced)
    # same count, but one reading collapsed onto its same-millisecond twin's value
    r = produced[a][99]
    assert any(x.ts_ms == r.ts_ms and x.sensor == r.sensor and x is not r for x in produced[a])
    wrong = {a: [*produced[a][:99], msgspec.structs.replace(r, value=r.value + 1),
                 *produced[a][100:]], b: produced[b]}
    got = check(wrong)
    assert (got["exactly_once"], got["missing"], got["extra"], got["stored"]) == (
        False, 1, 1, 200)
    got = check({a: produced[a] + produced[a][:1], b: produced[b][1:]})
    assert (got["exactly_once"], got["missing"], got["stored_twice"]) == (False, 1, 1)
