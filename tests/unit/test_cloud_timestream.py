"""Timestream store: record mapping and the boto3 writer against moto's mock (the real
service cannot be reached from here), error translation, query row mapping."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("boto3")
moto = pytest.importorskip("moto")

from botocore.exceptions import ClientError, EndpointConnectionError  # noqa: E402

from cloud.ingest import IngestService  # noqa: E402
from cloud.stores.base import StoreRejected, StoreUnavailable  # noqa: E402
from cloud.stores.timestream import TimestreamStore, from_row, to_record  # noqa: E402
from pymigrate.types import AggInfo, Priority, Reading  # noqa: E402
from tests.unit.cloud_helpers import incoming, make_readings, payload  # noqa: E402


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    with moto.mock_aws():
        yield


def _backend_records(db: str, table: str) -> list[dict[str, Any]]:
    from moto.timestreamwrite.models import timestreamwrite_backends

    backend = timestreamwrite_backends["123456789012"]["us-east-1"]
    return list(backend.databases[db].tables[table].records)


def test_record_mapping() -> None:
    r = Reading("gw", "temp", 1_700_000_000_123, 21.5, Priority.HIGH, 42, 1_700_000_000_100,
                1, 7, AggInfo("w10", "avg", 1_700_000_000_123, 60))
    rec = to_record(r)
    assert rec["Dimensions"] == [{"Name": "device_id", "Value": "gw"},
                                 {"Name": "sensor", "Value": "temp"},
                                 {"Name": "agg_fn", "Value": "avg"},
                                 {"Name": "agg_rule", "Value": "w10"}]
    assert rec["Time"] == "1700000000123" and rec["TimeUnit"] == "MILLISECONDS"
    assert rec["Version"] == 42 and rec["MeasureValueType"] == "MULTI"
    vals = {v["Name"]: (v["Value"], v["Type"]) for v in rec["MeasureValues"]}
    assert vals["value"] == ("21.5", "DOUBLE") and vals["seq"] == ("42", "BIGINT")
    assert vals["raw_ts_ms"] == ("1700000000100", "BIGINT") and vals["agg_count"][0] == "60"
    row = {d["Name"]: d["Value"] for d in rec["Dimensions"]} | {
        k: v[0] for k, v in vals.items()} | {"ts_ms": rec["Time"]}
    assert from_row(row) == r
    plain = to_record(Reading("gw", "t", 5, 1.0, seq=1))
    assert len(plain["Dimensions"]) == 2 and len(plain["MeasureValues"]) == 5


async def test_write_through_moto_exactly_once(aws: None, tmp_path: Path) -> None:
    s = TimestreamStore("pm", "readings", ledger_path=tmp_path / "l.db", create=True)
    await s.open()
    try:
        await s._call(s._ensure)  # a second create is a no-op (ConflictException)
        svc = IngestService(s)
        data = payload("gw", make_readings("gw", 250))
        ack = await svc.handle(incoming(data))
        assert (ack.status, ack.accepted) == ("ok", 250)
        assert len(_backend_records("pm", "readings")) == 250  # in 3 calls of <= 100
        again = await svc.handle(incoming(data))
        assert (again.status, again.duplicates) == ("duplicate", 250)
        assert len(_backend_records("pm", "readings")) == 250
        assert (await s.idempotency_state("gw")).watermark == 250
        bad = payload("gw", [Reading("gw", "t", 1, float("nan"), seq=251)], "nan")
        ack = await svc.handle(incoming(bad))
        assert (ack.status, ack.reason) == ("rejected", "non_finite_value")
        assert await s.dead_letters() == [("gw", "nan", "non_finite_value")]
    finally:
        await s.close()


class StubWrite:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def write_records(self, **kw: Any) -> None:
        raise self.exc


class StubQuery:
    def __init__(self, pages: list[dict[str, Any]]) -> None:
        self.pages = pages
        self.sql: list[str] = []

    def get_paginator(self, name: str) -> StubQuery:
        assert name == "query"
        return self

    def paginate(self, QueryString: str) -> list[dict[str, Any]]:
        self.sql.append(QueryString)
        return self.pages


def _client_error(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}}, "WriteRecords")


@pytest.mark.parametrize(("exc", "kind"), [
    (_client_error("ValidationException"), StoreRejected),
    (_client_error("RejectedRecordsException"), StoreRejected),
    (_client_error("ThrottlingException"), StoreUnavailable),
    (EndpointConnectionError(endpoint_url="https://x"), StoreUnavailable),
])
async def test_error_translation(tmp_path: Path, exc: Exception, kind: type) -> None:
    s = TimestreamStore("pm", "t", ledger_path=tmp_path / "l.db", write_client=StubWrite(exc),
                        query_client=StubQuery([]))
    await s.open()
    try:
        with pytest.raises(kind):
            await s.write("d", "b", make_readings("d", 3))
        assert (await s.idempotency_state("d")).watermark == 0
    finally:
        await s.close()


async def test_query_and_count(tmp_path: Path) -> None:
    cols = [{"Name": n} for n in ("device_id", "sensor", "ts_ms", "value", "seq", "priority",
                                  "quality", "uncert_ms", "raw_ts_ms", "agg_fn", "agg_rule",
                                  "agg_window_end_ms", "agg_count")]
    row = {"Data": [{"ScalarValue": v} for v in ("d", "s", "1000", "2.5", "3", "1", "0", "4")]
           + [{"NullValue": True}] * 5}
    q = StubQuery([{"ColumnInfo": cols, "Rows": [row]}])
    s = TimestreamStore("pm", "t", ledger_path=tmp_path / "l.db", write_client=object(),
                        query_client=q)
    await s.open()
    try:
        got = await s.query("d", "s", 0, 2000)
        assert got == [Reading("d", "s", 1000, 2.5, Priority.HIGH, 3, None, 0, 4)]
        assert "device_id = 'd'" in q.sql[0] and "from_milliseconds(2000)" in q.sql[0]
        q.pages = [{"ColumnInfo": [{"Name": "n"}], "Rows": [{"Data": [{"ScalarValue": "7"}]}]}]
        assert await s.count("d") == 7
        q.pages = [{"ColumnInfo": [{"Name": "n"}], "Rows": []}]
        assert await s.count() == 0
    finally:
        await s.close()
