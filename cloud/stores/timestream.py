"""AWS Timestream store: record mapping and a writer on the AWS SDK (boto3).

Tested against moto's Timestream mock only: the real service cannot be reached from the
development machines. ``boto3`` is imported lazily (a dev/optional dependency).

Record mapping (one multi-measure record per reading)::

    Dimensions      device_id, sensor [, agg_fn, agg_rule]
    MeasureName     "reading"  (MeasureValueType MULTI)
    MeasureValues   value DOUBLE, seq/priority/quality/uncert_ms BIGINT
                    [, raw_ts_ms BIGINT] [, agg_window_end_ms, agg_count BIGINT]
    Time            ts_ms, TimeUnit MILLISECONDS
    Version         seq

Timestream upserts on (dimensions, measure name, time): the same record written again
is accepted and changes nothing; a *different* record there wins only with a higher
version, so with ``Version = seq`` a later reading of the same series and instant
replaces an earlier one (the "last" policy). The per-device sequence state and the dead
letters live in a :class:`~cloud.stores.ledger.SqliteLedger` beside the ingest.
``WriteRecords`` takes at most 100 records per call; throttling and 5xx are retried by
the SDK (``standard`` retry mode), then reported as an outage.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from cloud.stores.base import (
    StoreRejected,
    StoreUnavailable,
)
from cloud.stores.ledger import LedgerBacked, SqliteLedger
from pymigrate.types import AggInfo, Priority, Reading

__all__ = ["MAX_RECORDS", "TimestreamStore", "to_record"]

MAX_RECORDS = 100
_REJECT_CODES = {"RejectedRecordsException", "ValidationException"}


def _int(name: str, v: int) -> dict[str, str]:
    return {"Name": name, "Value": str(v), "Type": "BIGINT"}


def to_record(r: Reading) -> dict[str, Any]:
    """The Timestream ``WriteRecords`` record of one reading (module docstring)."""
    dims = [{"Name": "device_id", "Value": r.device_id}, {"Name": "sensor", "Value": r.sensor}]
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
            "MeasureValues": values, "Time": str(r.ts_ms), "TimeUnit": "MILLISECONDS",
            "Version": r.seq}


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
                 ledger_path: str | Path = "timestream-ledger.db", create: bool = False,
                 write_client: Any = None, query_client: Any = None,
                 max_attempts: int = 5) -> None:
        self.database, self.table, self.region = database, table, region
        self.ledger = SqliteLedger(ledger_path)
        self.create = create
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

    def _ensure(self) -> None:
        w = self._write
        try:
            w.create_database(DatabaseName=self.database)
        except w.exceptions.ConflictException:
            pass
        try:
            w.create_table(DatabaseName=self.database, TableName=self.table)
        except w.exceptions.ConflictException:
            pass

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

    def _write_all(self, records: list[dict[str, Any]]) -> None:
        for i in range(0, len(records), MAX_RECORDS):
            self._write.write_records(DatabaseName=self.database, TableName=self.table,
                                      Records=records[i:i + MAX_RECORDS])

    async def _sink(self, readings: list[Reading]) -> None:
        await self._call(self._write_all, [to_record(r) for r in readings])

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
