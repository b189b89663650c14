"""``pymigrate cloud query``: a device's series for a time range, as a table or JSON."""

from __future__ import annotations

import io
import json
from pathlib import Path

import msgspec
import pytest

from cloud.query import aggregate_readings, format_table, main, parse_duration_ms, parse_time_ms
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


HOUR = 3_600_000


@pytest.fixture
async def hourly(tmp_path: Path) -> tuple[Path, list[Reading]]:
    """Two and a half hours of 3 sensors every 60 s, plus one reading before the epoch."""
    rs = [*make_readings("dev", 450, step_ms=60_000), Reading("dev", "s0", -1, 7.5, seq=999)]
    path = tmp_path / "agg.db"
    s = SqliteStore(path)
    await s.open()
    await s.write("dev", "b", rs)
    await s.close()
    return path, rs


def _doc(argv: list[str]) -> dict[str, object]:
    out = io.StringIO()
    assert main([*argv, "--format", "json"], out=out) == 0
    doc: dict[str, object] = json.loads(out.getvalue())
    return doc


def test_agg_in_sql_matches_the_readings(hourly: tuple[Path, list[Reading]]) -> None:
    path, rs = hourly
    doc = _doc(["dev", "--sqlite-path", str(path), "--agg", "1h"])
    want = json.loads(msgspec.json.encode(aggregate_readings(rs, HOUR)))
    got = doc["buckets"]
    assert isinstance(got, list) and len(got) == len(want) == 3 * 3 + 1
    for g, w in zip(got, want):
        assert {k: g[k] for k in ("sensor", "bucket_ms", "min", "max", "count")} == {
            k: w[k] for k in ("sensor", "bucket_ms", "min", "max", "count")}
        assert g["sum"] == pytest.approx(w["sum"]) and g["avg"] == pytest.approx(w["avg"])
    assert got[0]["bucket_ms"] == -HOUR and got[0]["count"] == 1  # floor, not truncation
    assert sum(g["count"] for g in got) == len(rs)
    # a window inside an hour is widened to the whole hour; a sensor filter
    doc = _doc(["dev", "--sqlite-path", str(path), "--agg", "1h", "--sensor", "s1",
                "--start", str(T0 + HOUR + 5), "--end", str(T0 + HOUR + 10)])
    assert [(b["sensor"], b["bucket_ms"], b["count"]) for b in doc["buckets"]] == [
        ("s1", T0 + HOUR, 60)]


def test_agg_table_and_fallback_without_sql(hourly: tuple[Path, list[Reading]],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path, rs = hourly
    out = io.StringIO()
    assert main(["dev", "--sqlite-path", str(path), "--agg", "30m", "--limit", "2"],
                out=out) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["bucket_utc", "sensor", "min", "max", "avg", "sum", "count"]
    assert lines[-1] == f"({len(aggregate_readings(rs, HOUR // 2))} buckets, 2 shown)"
    sql = _doc(["dev", "--sqlite-path", str(path), "--agg", "30m"])

    class QueryOnly:  # a store without an aggregate query (InfluxDB, Timestream)
        def __init__(self, inner: SqliteStore) -> None:
            self.inner = inner

        async def open(self) -> None:
            await self.inner.open()

        async def close(self) -> None:
            await self.inner.close()

        async def query(self, *a: object) -> list[Reading]:
            return await self.inner.query(*a)  # type: ignore[arg-type]

    import cloud.query as q

    monkeypatch.setattr(q, "build_store", lambda cfg: QueryOnly(SqliteStore(path)))
    py = _doc(["dev", "--sqlite-path", str(path), "--agg", "30m"])
    assert [(b["sensor"], b["bucket_ms"], b["count"]) for b in py["buckets"]] == [
        (b["sensor"], b["bucket_ms"], b["count"]) for b in sql["buckets"]]
    out = io.StringIO()
    assert main(["dev", "--sqlite-path", str(path), "--agg", "0s"], out=out) == 2
    assert main(["nobody", "--sqlite-path", str(path), "--agg", "1h"], out=out) == 1
