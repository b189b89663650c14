"""``pymigrate cloud query``: a device's series for a time range, as a table or JSON."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from cloud.query import format_table, main, parse_duration_ms, parse_time_ms
from cloud.stores.sqlite import SqliteStore
from pymigrate.types import AggInfo, Reading
from tests.conftest import free_port
from tests.unit.cloud_helpers import T0, make_readings


@pytest.fixture
async def db(tmp_path: Path) -> Path:
    path = tmp_path / "cloud.db"
    s = SqliteStore(path)
    await s.open()
    await s.write("dev", "b", [*make_readings("dev", 9),
                               Reading("dev", "s9", T0 + 50_000, 3.5, seq=10,
                                       agg=AggInfo("w", "avg", T0 + 50_000, 6))])
    await s.close()
    return path


def test_time_and_duration_parsing() -> None:
    assert parse_time_ms("1767225600000") == T0
    assert parse_time_ms("2026-01-01T00:00:00Z") == T0
    assert parse_time_ms("2026-01-01T01:00:00+01:00") == T0
    assert parse_time_ms("2026-01-01 00:00:01") == T0 + 1000  # naive = UTC
    assert parse_duration_ms("90s") == 90_000 and parse_duration_ms("1.5h") == 5_400_000
    with pytest.raises(ValueError):
        parse_time_ms("yesterday")
    with pytest.raises(ValueError):
        parse_duration_ms("5 weeks")


def test_table_output(db: Path) -> None:
    out = io.StringIO()
    rc = main(["dev", "--sqlite-path", str(db), "--sensor", "s1",
               "--start", "2026-01-01T00:00:00Z", "--end", str(T0 + 3000)], out=out)
    lines = out.getvalue().splitlines()
    assert rc == 0
    assert lines[0].split() == ["time_utc", "sensor", "value", "seq", "prio", "quality", "agg"]
    assert [ln.split()[3] for ln in lines[1:-1]] == ["1", "4", "7"]  # s1 at T0 + 0, 1, 2 s
    assert lines[1].startswith("2026-01-01T00:00:00.000+00:00  s1")
    assert lines[-1] == "(3 readings)"


def test_json_output_and_limit(db: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "cloud.toml"
    cfg.write_text(f'[cloud]\nstore = "sqlite"\n[cloud.sqlite]\npath = "{db}"\n')
    out = io.StringIO()
    assert main(["dev", "--config", str(cfg), "--format", "json", "--limit", "3",
                 "--start", str(T0), "--last", "1h"], out=out) == 0
    doc = json.loads(out.getvalue())
    assert doc["count"] == 10 and len(doc["readings"]) == 3
    assert doc["start_ms"] == T0 and doc["end_ms"] == T0 + 3_600_000
    out = io.StringIO()
    main(["dev", "--sqlite-path", str(db), "--sensor", "s9"], out=out)
    assert "avg/w n=6" in out.getvalue()
    out = io.StringIO()
    main(["dev", "--sqlite-path", str(db), "--limit", "2"], out=out)
    assert out.getvalue().splitlines()[-1] == "(10 readings, 2 shown)"


def test_exit_codes(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = io.StringIO()
    assert main(["nobody", "--sqlite-path", str(db)], out=out) == 1
    assert main(["dev", "--sqlite-path", str(db), "--last", "1h"], out=out) == 1  # all old
    assert main(["dev", "--sqlite-path", str(db), "--start", "soon"], out=out) == 2
    bad = tmp_path / "bad.toml"
    bad.write_text("[cloud]\nstore = 'oracle'\n")
    assert main(["dev", "--config", str(bad)], out=out) == 2
    assert "cloud.store" in capsys.readouterr().err
    dsn = f"postgresql://postgres@127.0.0.1:{free_port()}/x"
    assert main(["dev", "--store", "postgres", "--dsn", dsn, "--schema", "s"], out=out) == 3


def test_format_table_empty() -> None:
    assert format_table([]).split() == ["time_utc", "sensor", "value", "seq", "prio",
                                        "quality", "agg"]
