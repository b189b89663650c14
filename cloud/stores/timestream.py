"""AWS Timestream store: record mapping and a writer on the AWS SDK (boto3).

Install with ``pip install 'pymigrate-iot[timestream]'`` (boto3 is imported lazily).
Tested against moto's Timestream mock plus a fake client that answers
``RejectedRecordsException`` the way the AWS API reference documents it: the real
service cannot be reached from the development machines.

Record mapping (one multi-measure record per reading)::

    Dimensions      device_id, sensor [, agg_fn, agg_rule]
    MeasureName     "reading"  (MeasureValueType MULTI)
    MeasureValues   value DOUBLE, seq/priority/quality/uncert_ms BIGINT
                    [, raw_ts_ms BIGINT] [, agg_window_end_ms, agg_count BIGINT]
    Time            ts_ms * 1e6 + seq mod 1e6, TimeUnit NANOSECONDS
    Version         seq

Every reading its own record: Timestream identifies a record by dimensions, measure
name and time, so the time carries a sub-millisecond offset from the sequence number
(as the InfluxDB store does): two readings of one sensor in one millisecond are two
records, a resent reading is the same record (accepted, changes nothing). Queries read
``to_milliseconds(time)``. The idempotency state is a SQLite file per host
(``ledger_path``) or, for replicas on several hosts, PostgreSQL (``ledger_dsn``:
:class:`~cloud.stores.ledger_pg.PgLedger`).

Never losing a backlog: a table created here (``create = true``) has magnetic-store
writes enabled, so records older than the memory-store retention (a device that was
offline for days) are still accepted; ``memory_retention_h`` and
``magnetic_retention_days`` set the two retentions; an existing table is updated to them.
``WriteRecords`` takes at most 100 records per call; pages are written in order. A
``RejectedRecordsException`` lists the refused records one by one (``RecordIndex``,
``Reason``, ``ExistingVersion``): each becomes a dead letter (its reading as JSON, its
reason: ``timestream_too_old`` outside the retention windows, ``timestream_version`` a
version conflict, else ``timestream_rejected_record``) and the page's other records are
written again (identical records: a no-op if AWS already stored them, as it does), so
they are stored whatever the partial-success semantics. A batch whose every record is
refused is rejected as a whole. Throttling and 5xx are retried by the SDK (``standard``
retry mode), then reported as an outage; when a later page fails that way, the ledger
keeps the pages that were stored (:class:`~cloud.stores.ledger.LedgerBacked`) and the
device's resend writes only the rest. Version conflicts in the *magnetic* store are
reported by AWS asynchronously to ``rejected_data_bucket`` (S3) when set, never in the
response.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from cloud.stores.base import (
    StoreRejected,
    StoreUnavailable,
)
from cloud.stores.ledger import Ledger, LedgerBacked, SinkOutcome, SqliteLedger
from pymigrate.types import AggInfo, Priority, Reading

__all__ = ["MAX_RECORDS", "TimestreamStore", "reject_reason", "to_record"]

MAX_RECORDS = 100
NS_PER_MS = 1_000_000
_REJECT_CODES = {"RejectedRecordsException", "ValidationException"}


def reject_reason(rejected: dict[str, Any]) -> str:
    """Reason code of one ``RejectedRecords`` entry (module docstring)."""
    text = str(rejected.get("Reason", "")).lower()
    if rejected.get("ExistingVersion") is not None or "version" in text:
        return "timestream_version"
    if "retention" in text or ("time" in text and ("range" in text or "window" in text)):
        return "timestream_too_old"
    return "timestream_rejected_record"


def _int(name: str, v: int) -> dict[str, str]:
    return {"Name": name, "Value": str(v), "Type": "BIGINT"}


def to_record(r: Reading, instance: str = "") -> dict[str, Any]:
    """The Timestream ``WriteRecords`` record of one reading (module docstring);
    ``instance`` (the agent's stream id) is a dimension when set."""
    dims = [{"Name": "device_id", "Value": r.device_id}, {"Name": "sensor", "Value": r.sensor}]
    if instance:
        dims.append({"Name": "instance", "Value": instance})
    values: list[dict[str, str]] = [
        {"Name": "value", "Value": repr(float(r.value)), "Type": "DOUBLE"},
        _int("seq", r.seq), _int("priority", int(r.priority)), _int("quality", r.quality),
        _int("uncert_ms", r.uncert_ms)]
    if r.raw_ts_ms is not None:
        values.append(_int("raw_ts_ms", r.raw_ts_ms))
    if r.agg is not None:
        dims += [{"Name": "agg_fn", "Value": r.agg.fn or "-"},
                 {"Name": "agg_rule", "Value": r.agg.rule or "-"}]
        values += [_int("agg_window_end_ms", r.agg.window_end_ms),
                   _int("agg_count", r.agg.count)]
    return {"Dimensions": dims, "MeasureName": "reading", "MeasureValueType": "MULTI",
            "MeasureValues": values, "Time": str(r.ts_ms * NS_PER_MS + r.seq % NS_PER_MS),
            "TimeUnit": "NANOSECONDS", "Version": r.seq}


def from_row(row: dict[str, str | None]) -> Reading:
    """A query row (column name -> scalar string) back into a Reading."""
    def i(k: str) -> int | None:
        v = row.get(k)
        return None if v is None else int(v)

    agg = None
    if row.get("agg_fn") is not None:
        agg = AggInfo(str(row.get("agg_rule") or ""), str(row["agg_fn"]),
                      i("agg_window_end_ms") or 0, i("agg_count") or 0)
    return Reading(device_id=str(row["device_id"]), sensor=str(row["sensor"]),
                   ts_ms=int(str(row["ts_ms"])), value=float(str(row["value"])),
                   priority=Priority(i("priority") or 0), seq=i("seq") or 0,
                   raw_ts_ms=i("raw_ts_ms"), quality=i("quality") or 0,
                   uncert_ms=i("uncert_ms") or 0, agg=agg)


def _q(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


class TimestreamStore(LedgerBacked):
    """Idempotent AWS Timestream store (see module docstring)."""

    name = "timestream"

    def __init__(self, database: str, table: str, *, region: str = "us-east-1",
                 ledger_path: str | Path = "timestream-ledger.db",
                 ledger: Ledger | None = None, create: bool = False,
                 memory_retention_h: int = 24, magnetic_retention_days: int = 3650,
                 rejected_data_bucket: str = "", write_client: Any = None,
                 query_client: Any = None, max_attempts: int = 5) -> None:
        self.database, self.table, self.region = database, table, region
        # a PgLedger (shared by replicas on every host) or a SQLite file on this host
        self.ledger: Ledger = ledger if ledger is not None else SqliteLedger(ledger_path)
        self.create = create
        self.memory_retention_h = memory_retention_h
        self.magnetic_retention_days = magnetic_retention_days
        self.rejected_data_bucket = rejected_data_bucket
        self.max_attempts = max_attempts
        self._write = write_client
        self._query = query_client

    async def open(self) -> None:
        await self.ledger.open()
        if self._write is None or self._query is None:
            import boto3
            from botocore.config import Config

            cfg = Config(retries={"max_attempts": self.max_attempts, "mode": "standard"})
            self._write = self._write or boto3.client("timestream-write",
                                                      region_name=self.region, config=cfg)
            self._query = self._query or boto3.client("timestream-query",
                                                      region_name=self.region, config=cfg)
        if self.create:
            await self._call(self._ensure)

    def table_properties(self) -> dict[str, Any]:
        """Retention and magnetic-store write settings for CreateTable / UpdateTable."""
        magnetic: dict[str, Any] = {"EnableMagneticStoreWrites": True}
        if self.rejected_data_bucket:
            magnetic["MagneticStoreRejectedDataLocation"] = {"S3Configuration": {
                "BucketName": self.rejected_data_bucket,
                "ObjectKeyPrefix": f"{self.database}/{self.table}/"}}
        return {"RetentionProperties": {
                    "MemoryStoreRetentionPeriodInHours": self.memory_retention_h,
                    "MagneticStoreRetentionPeriodInDays": self.magnetic_retention_days},
                "MagneticStoreWriteProperties": magnetic}

    def _ensure(self) -> None:
        w = self._write
        missing = w.exceptions.ResourceNotFoundException
        try:
            w.describe_database(DatabaseName=self.database)
        except missing:
            try:
                w.create_database(DatabaseName=self.database)
            except w.exceptions.ConflictException:
                pass  # a replica made it meanwhile
        props = self.table_properties()
        try:
            w.describe_table(DatabaseName=self.database, TableName=self.table)
        except missing:
            try:
                w.create_table(DatabaseName=self.database, TableName=self.table, **props)
                return
            except w.exceptions.ConflictException:
                pass
        # it exists: make it take a backlog too (and hold the configured retentions)
        w.update_table(DatabaseName=self.database, TableName=self.table, **props)

    async def close(self) -> None:
        await self.ledger.close()

    async def _call(self, fn: Any, *args: Any) -> Any:
        """Run a blocking SDK call in a thread; translate its errors."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return await asyncio.to_thread(fn, *args)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _REJECT_CODES:
                raise StoreRejected(f"Timestream refused the records: {exc}",
                                    reason=f"timestream_{code}") from exc
            raise StoreUnavailable(f"Timestream error {code}: {exc}") from exc
        except BotoCoreError as exc:
            raise StoreUnavailable(f"Timestream unreachable: {exc}") from exc

    def _write_page(self, records: list[dict[str, Any]]) -> list[tuple[int, str, str]]:
        """Write one page; returns the records refused one by one as (index, reason code,
        detail). The others are written again after a rejection (module docstring)."""
        from botocore.exceptions import ClientError

        refused: dict[int, tuple[str, str]] = {}
        todo = list(range(len(records)))
        for _ in range(2):
            try:
                self._write.write_records(DatabaseName=self.database, TableName=self.table,
                                          Records=[records[i] for i in todo])
                return [(i, *refused[i]) for i in sorted(refused)]
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "RejectedRecordsException":
                    raise
                listed = exc.response.get("RejectedRecords") or []
                if not listed:
                    raise
                for rej in listed:
                    i = todo[int(rej.get("RecordIndex", 0))]
                    refused[i] = (reject_reason(rej), str(rej.get("Reason", "")))
                todo = [i for i in todo if i not in refused]
                if not todo:
                    break
        return [(i, *refused[i]) for i in sorted(refused)]

    async def _sink(self, readings: list[Reading], instance: str = "") -> SinkOutcome:
        records = [to_record(r, instance) for r in readings]
        stored: list[Reading] = []
        rejected: list[tuple[Reading, str, str]] = []
        for p in range(0, len(records), MAX_RECORDS):
            page = readings[p:p + MAX_RECORDS]
            try:
                refused = await self._call(self._write_page, records[p:p + MAX_RECORDS])
            except (StoreUnavailable, StoreRejected) as exc:
                if not stored and not rejected:
                    raise  # nothing landed: the batch fails whole
                return SinkOutcome(stored, rejected, error=exc)
            out = {i for i, _, _ in refused}
            rejected += [(page[i], reason, detail) for i, reason, detail in refused]
            stored += [r for i, r in enumerate(page) if i not in out]
        return SinkOutcome(stored, rejected)

    def _select(self, what: str, device_id: str | None, sensor: str | None = None,
                start_ms: int | None = None, end_ms: int | None = None) -> str:
        sql = (f'SELECT {what} FROM "{self.database}"."{self.table}"'
               " WHERE measure_name = 'reading'")
        if device_id is not None:
            sql += f" AND device_id = {_q(device_id)}"
        if sensor is not None:
            sql += f" AND sensor = {_q(sensor)}"
        if start_ms is not None:
            sql += f" AND time >= from_milliseconds({int(start_ms)})"
        if end_ms is not None:
            sql += f" AND time < from_milliseconds({int(end_ms)})"
        return sql

    def _rows(self, sql: str) -> list[dict[str, str | None]]:
        out: list[dict[str, str | None]] = []
        for page in self._query.get_paginator("query").paginate(QueryString=sql):
            cols = [c["Name"] for c in page["ColumnInfo"]]
            for row in page["Rows"]:
                out.append({c: d.get("ScalarValue") for c, d in zip(cols, row["Data"])})
        return out

    async def query(self, device_id: str, sensor: str | None = None,
                    start_ms: int | None = None, end_ms: int | None = None) -> list[Reading]:
        sql = self._select("device_id, sensor, to_milliseconds(time) AS ts_ms, value, seq,"
                           " priority, quality, uncert_ms, raw_ts_ms, agg_fn, agg_rule,"
                           " agg_window_end_ms, agg_count", device_id, sensor, start_ms, end_ms)
        rows = await self._call(self._rows, sql + " ORDER BY sensor, time, seq")
        return [from_row(r) for r in rows]

    async def count(self, device_id: str | None = None) -> int:
        rows = await self._call(self._rows, self._select("count(*) AS n", device_id))
        return int(str(rows[0]["n"])) if rows else 0
