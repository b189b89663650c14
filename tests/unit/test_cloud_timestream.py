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
    # ms in ns plus seq mod 1e6: readings of one series in one ms stay distinct records
    assert rec["Time"] == "1700000000123000042" and rec["TimeUnit"] == "NANOSECONDS"
    assert rec["Version"] == 42 and rec["MeasureValueType"] == "MULTI"
    vals = {v["Name"]: (v["Value"], v["Type"]) for v in rec["MeasureValues"]}
    assert vals["value"] == ("21.5", "DOUBLE") and vals["seq"] == ("42", "BIGINT")
    assert vals["raw_ts_ms"] == ("1700000000100", "BIGINT") and vals["agg_count"][0] == "60"
    row = {d["Name"]: d["Value"] for d in rec["Dimensions"]} | {
        k: v[0] for k, v in vals.items()} | {"ts_ms": str(int(rec["Time"]) // 1_000_000)}
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


# -- backlog: magnetic-store writes, rejections record by record, later pages failing ---------
def test_table_created_for_backlogs_and_existing_table_updated(aws: None,
                                                                tmp_path: Path) -> None:
    import asyncio

    import boto3

    w = boto3.client("timestream-write", region_name="us-east-1")
    w.create_database(DatabaseName="pm")
    w.create_table(DatabaseName="pm", TableName="old")  # made elsewhere, no magnetic writes

    async def run() -> None:
        for table in ("new", "old"):
            s = TimestreamStore("pm", table, ledger_path=tmp_path / f"{table}.db", create=True,
                                memory_retention_h=12, magnetic_retention_days=400,
                                rejected_data_bucket="pm-rejects")
            await s.open()
            await s.close()

    asyncio.run(run())
    for table in ("new", "old"):
        t = w.describe_table(DatabaseName="pm", TableName=table)["Table"]
        assert t["MagneticStoreWriteProperties"]["EnableMagneticStoreWrites"] is True
        loc = t["MagneticStoreWriteProperties"]["MagneticStoreRejectedDataLocation"]
        assert loc["S3Configuration"]["BucketName"] == "pm-rejects"
        assert t["RetentionProperties"] == {"MemoryStoreRetentionPeriodInHours": 12,
                                            "MagneticStoreRetentionPeriodInDays": 400}


class FakeTimestream:
    """A ``timestream-write`` client answering ``WriteRecords`` as the AWS API reference
    (WriteRecords, RejectedRecordsException, RejectedRecord) documents: records are keyed
    by dimensions + measure name + time; a record older than the ingestion window
    (``min_time_ns``) or one whose version is not higher than a stored one with other
    values is refused, listed in ``RejectedRecords`` with its ``RecordIndex`` (0-based,
    in the request), ``Reason`` and, for a version conflict, ``ExistingVersion``.
    ``partial``: the request's other records are stored (True) or not (False): the
    store must end up right either way. ``fail_calls``: call numbers (1-based) answered
    with ThrottlingException, as after the SDK gave up retrying."""

    def __init__(self, *, min_time_ns: int = 0, partial: bool = True,
                 fail_calls: tuple[int, ...] = ()) -> None:
        self.min_time_ns = min_time_ns
        self.partial = partial
        self.fail_calls = fail_calls
        self.calls = 0
        self.records: dict[tuple[Any, ...], dict[str, Any]] = {}

    @staticmethod
    def key(rec: dict[str, Any]) -> tuple[Any, ...]:
        dims = tuple((d["Name"], d["Value"]) for d in rec["Dimensions"])
        return dims, rec["MeasureName"], rec["Time"]

    def write_records(self, *, DatabaseName: str, TableName: str,
                      Records: list[dict[str, Any]]) -> dict[str, Any]:
        self.calls += 1
        if self.calls in self.fail_calls:
            raise ClientError({"Error": {"Code": "ThrottlingException", "Message": "slow"}},
                              "WriteRecords")
        rejected: list[dict[str, Any]] = []
        for i, rec in enumerate(Records):
            old = self.records.get(self.key(rec))
            if int(rec["Time"]) < self.min_time_ns:
                rejected.append({"RecordIndex": i, "Reason": (
                    "The record timestamp is outside the time range [2026-01-01T00:00:00Z,"
                    " 2026-01-02T00:00:00Z) of the data ingestion window.")})
            elif old is not None and old != rec and old["Version"] >= rec["Version"]:
                rejected.append({"RecordIndex": i, "ExistingVersion": old["Version"],
                                 "Reason": "A record with a higher version exists."})
        if rejected and not self.partial:
            pass  # all or nothing
        else:
            refused = {r["RecordIndex"] for r in rejected}
            for i, rec in enumerate(Records):
                if i not in refused:
                    self.records[self.key(rec)] = rec
        if rejected:
            raise ClientError({"Error": {"Code": "RejectedRecordsException",
                                         "Message": "One or more records have been rejected."
                                                    " See RejectedRecords for details."},
                               "RejectedRecords": rejected}, "WriteRecords")
        return {"RecordsIngested": {"Total": len(Records)}}

    def seqs(self) -> list[int]:
        return sorted(int(r["Version"]) for r in self.records.values())


async def _fake_store(tmp_path: Path, fake: FakeTimestream) -> TimestreamStore:
    s = TimestreamStore("pm", "t", ledger_path=tmp_path / "l.db", write_client=fake,
                        query_client=StubQuery([]))
    await s.open()
    return s


async def _payloads(s: TimestreamStore) -> list[tuple[str, dict[str, Any]]]:
    import json

    async with s.ledger.db.execute("SELECT reason, payload FROM dead_letters ORDER BY id") as c:
        return [(str(r), json.loads(p)) async for r, p in c]


@pytest.mark.parametrize("partial", [True, False])
async def test_rejected_records_dead_lettered_one_by_one_rest_written(
        tmp_path: Path, partial: bool) -> None:
    """250 readings in 3 pages: 2 too old for the ingestion window (page 2), 1 version
    conflict (page 3, a different record already stored there with a higher version)."""
    from tests.unit.cloud_helpers import T0

    rs = make_readings("d", 250)
    old = {120, 130}
    rs = [Reading("d", r.sensor, 5_000 if r.seq in old else r.ts_ms, r.value, seq=r.seq)
          for r in rs]
    fake = FakeTimestream(min_time_ns=T0 * 1_000_000, partial=partial)
    squatter = to_record(Reading("d", rs[239].sensor, rs[239].ts_ms, -1.0, seq=rs[239].seq))
    squatter["Version"] = 10_000
    fake.records[fake.key(squatter)] = squatter
    s = await _fake_store(tmp_path, fake)
    try:
        svc = IngestService(s)
        ack = await svc.handle(incoming(payload("d", rs, "big")))
        assert (ack.status, ack.accepted) == ("ok", 247)  # only what was written
        assert fake.seqs() == sorted([r.seq for r in rs if r.seq not in old | {240}] + [10_000])
        letters = await _payloads(s)
        assert [(reason, p["reading"]["seq"]) for reason, p in letters] == [
            ("timestream_too_old", 120), ("timestream_too_old", 130),
            ("timestream_version", 240)]
        assert "ingestion window" in letters[0][1]["detail"]
        assert letters[2][1]["reading"]["value"] == rs[239].value  # the payload: the reading
        assert await s.dead_letters() == [("d", "big", "timestream_version"),
                                          ("d", "big", "timestream_too_old"),
                                          ("d", "big", "timestream_too_old")]
        assert (await s.idempotency_state("d")).watermark == 250  # all handled
        again = await svc.handle(incoming(payload("d", rs, "big")))
        assert (again.status, again.duplicates) == ("duplicate", 250)
    finally:
        await s.close()


async def test_every_record_rejected_rejects_the_batch(tmp_path: Path) -> None:
    fake = FakeTimestream(min_time_ns=2**62)
    s = await _fake_store(tmp_path, fake)
    try:
        svc = IngestService(s)
        ack = await svc.handle(incoming(payload("d", make_readings("d", 5), "b")))
        assert (ack.status, ack.reason) == ("rejected", "timestream_too_old")
        assert await s.dead_letters() == [("d", "b", "timestream_too_old")]  # the payload
        assert (await s.idempotency_state("d")).watermark == 0 and fake.records == {}
    finally:
        await s.close()


async def test_later_page_failing_keeps_the_ledger_on_what_was_stored(tmp_path: Path) -> None:
    fake = FakeTimestream(fail_calls=(3,))  # page 3 of 3: throttled past the SDK's retries
    s = await _fake_store(tmp_path, fake)
    try:
        svc = IngestService(s)
        data = payload("d", make_readings("d", 250), "b")
        ack = await svc.handle(incoming(data))
        assert (ack.status, ack.reason) == ("error", "store_unavailable")  # device keeps it
        assert fake.seqs() == list(range(1, 201))
        state = await s.idempotency_state("d")
        assert state.watermark == 200  # exactly what is stored, not rolled back
        again = await svc.handle(incoming(data))  # the device's retry
        assert (again.status, again.accepted, again.duplicates) == ("ok", 50, 200)
        assert fake.seqs() == list(range(1, 251)) and fake.calls == 4
    finally:
        await s.close()


def test_same_millisecond_readings_are_distinct_records() -> None:
    a, b = Reading("d", "s", 1000, 1.0, seq=7), Reading("d", "s", 1000, 2.0, seq=8)
    assert FakeTimestream.key(to_record(a)) != FakeTimestream.key(to_record(b))
    assert FakeTimestream.key(to_record(a)) == FakeTimestream.key(to_record(a))
