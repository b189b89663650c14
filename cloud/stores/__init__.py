"""Cloud stores behind one interface; :func:`cloud.config.build_store` picks one by name.

``sqlite`` (embedded default), ``postgres`` (PostgreSQL/TimescaleDB, asyncpg),
``influx`` (InfluxDB 1.x/2.x line protocol over HTTP), ``timestream`` (AWS, boto3).
The heavy ones are imported from their modules so their client libraries load on demand.
"""

from cloud.stores.base import (
    Admission,
    Store,
    StoreRejected,
    StoreUnavailable,
    WriteResult,
    plan_write,
    validate,
)
from cloud.stores.sqlite import SqliteStore

STORES = {
    "sqlite": "cloud.stores.sqlite:SqliteStore",
    "postgres": "cloud.stores.postgres:PostgresStore",
    "influx": "cloud.stores.influx:InfluxStore",
    "timestream": "cloud.stores.timestream:TimestreamStore",
}

__all__ = ["STORES", "Admission", "SqliteStore", "Store", "StoreRejected", "StoreUnavailable",
           "WriteResult", "plan_write", "validate"]
