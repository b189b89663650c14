"""Cloud config (phase one: parse/validate, errors name the key; phase two: build) and
the per-device rate limiter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cloud.config import CloudConfig, build_ingest, build_store, parse_cloud_config
from cloud.dedup import ConflictPolicy
from cloud.ratelimit import DeviceRateLimiter
from cloud.stores.sqlite import SqliteStore
from pymigrate.clock import VirtualClock
from pymigrate.errors import ConfigError, ThrottledError


def test_defaults() -> None:
    cfg = parse_cloud_config({})
    assert cfg == CloudConfig()
    assert cfg.store == "sqlite" and cfg.sqlite.path == "cloud.db"
    assert cfg.listeners == ["coap"] and cfg.coap.port == 5683
    assert cfg.dedup.conflict_policy is None  # off: distinct seqs are distinct readings
    assert cfg.dedup.gateway_tolerance_ms == 0 and cfg.rate_limit.batches_per_s == 0


@pytest.mark.parametrize(("data", "key"), [
    ({"stor": "sqlite"}, "cloud.stor"),
    ({"store": "mongodb"}, "cloud.store"),
    ({"postgres": {"dsn": 5}}, "cloud.postgres.dsn"),
    ({"postgres": {"pool_min": 5, "pool_max": 2}}, "cloud.postgres.pool_max"),
    ({"postgres": {"bulk": "insert"}}, "cloud.postgres.bulk"),
    ({"postgres": {"timescale": "yes"}}, "cloud.postgres.timescale"),
    ({"postgres": {"chunk_interval_h": 0}}, "cloud.postgres.chunk_interval_h"),
    ({"postgres": {"compress_after_h": -1}}, "cloud.postgres.compress_after_h"),
    ({"postgres": {"retention_days": -2}}, "cloud.postgres.retention_days"),
    ({"timestream": {"memory_retention_h": 0}}, "cloud.timestream.memory_retention_h"),
    ({"timestream": {"magnetic_retention_days": 80000}},
     "cloud.timestream.magnetic_retention_days"),
    ({"influx": {"version": 3}}, "cloud.influx.version"),
    ({"influx": {"version": 2}}, "cloud.influx.org"),
    ({"listeners": ["coap", "http"]}, "cloud.listeners[1]"),
    ({"coap": {"port": 70000}}, "cloud.coap.port"),
    ({"dedup": {"conflict_policy": "newest"}}, "cloud.dedup.conflict_policy"),
    ({"dedup": {"gateway_tolerance_ms": -1}}, "cloud.dedup.gateway_tolerance_ms"),
    ({"store": "influx", "dedup": {"gateway_tolerance_ms": 500, "gateway_policy": "last"}},
     "cloud.dedup.gateway_policy"),
    ({"max_batch_bytes": 10}, "cloud.max_batch_bytes"),
    ({"rate_limit": {"batches_per_s": -1}}, "cloud.rate_limit"),
])
def test_errors_name_the_key(data: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_cloud_config(data)
    assert ei.value.key == key, ei.value


def test_build_each_store(tmp_path: Path) -> None:
    from cloud.stores.influx import InfluxStore
    from cloud.stores.postgres import PostgresStore
    from cloud.stores.timestream import TimestreamStore

    s = build_store(parse_cloud_config({"sqlite": {"path": str(tmp_path / "x.db")}}))
    assert isinstance(s, SqliteStore) and s.path == tmp_path / "x.db"
    pg = build_store(parse_cloud_config({"store": "postgres", "postgres": {
        "dsn": "postgresql://h/db", "schema": "iot", "pool_max": 8, "bulk": "unnest"}}))
    assert isinstance(pg, PostgresStore) and (pg.schema, pg.pool_max, pg.bulk) == (
        "iot", 8, "unnest")
    assert pg.timescale == "auto" and pg.timescale_options.compress_after_ms == 7 * 86_400_000
    pg = build_store(parse_cloud_config({"store": "postgres", "postgres": {
        "timescale": "on", "chunk_interval_h": 6, "compress_after_h": 48,
        "retention_days": 30, "continuous_aggregate": False}}))
    assert isinstance(pg, PostgresStore) and pg.timescale == "on"
    o = pg.timescale_options
    assert (o.chunk_interval_ms, o.compress_after_ms, o.retention_ms, o.aggregate) == (
        6 * 3_600_000, 48 * 3_600_000, 30 * 86_400_000, False)
    inf = build_store(parse_cloud_config({"store": "influx", "influx": {
        "url": "http://i:8086/", "version": 2, "org": "o", "bucket": "b", "token": "t"}}))
    assert isinstance(inf, InfluxStore) and (inf.url, inf.version, inf.bucket) == (
        "http://i:8086", 2, "b")
    ts = build_store(parse_cloud_config({"store": "timestream", "timestream": {
        "table": "r2", "memory_retention_h": 12, "magnetic_retention_days": 400}}))
    assert isinstance(ts, TimestreamStore) and ts.table == "r2"
    assert ts.table_properties()["RetentionProperties"] == {
        "MemoryStoreRetentionPeriodInHours": 12, "MagneticStoreRetentionPeriodInDays": 400}
    assert ts.table_properties()["MagneticStoreWriteProperties"] == {
        "EnableMagneticStoreWrites": True}
    with pytest.raises(ValueError):
        PostgresStore("postgresql://h/db", schema="bad; drop")
    with pytest.raises(ValueError):
        PostgresStore("postgresql://h/db", bulk="fast")
    with pytest.raises(ValueError):
        PostgresStore("postgresql://h/db", timescale="maybe")


def test_build_ingest(tmp_path: Path) -> None:
    cfg = parse_cloud_config({"dedup": {"gateway_tolerance_ms": 800, "gateway_policy": "average",
                                        "conflict_policy": "last"},
                              "rate_limit": {"batches_per_s": 5, "burst": 3},
                              "max_batch_bytes": 4096})
    svc = build_ingest(cfg, SqliteStore(tmp_path / "c.db"), clock=VirtualClock())
    assert svc.gateway.tolerance_ms == 800 and svc.gateway.policy is ConflictPolicy.AVERAGE
    assert svc.conflicts.policy is ConflictPolicy.LAST
    assert svc.limiter.rate == 5 and svc.max_batch_bytes == 4096
    plain = build_ingest(parse_cloud_config({}), SqliteStore(tmp_path / "c.db"))
    assert plain.gateway is None and plain.limiter is None


async def test_rate_limiter_buckets() -> None:
    clock = VirtualClock()
    lim = DeviceRateLimiter(10.0, 2, clock=clock, max_devices=3)
    lim.check("a")
    lim.check("a")
    with pytest.raises(ThrottledError) as ei:
        lim.check("a")
    assert ei.value.retry_after_s == pytest.approx(0.1) and lim.throttled == 1
    lim.check("b")  # independent bucket
    await clock.advance(0.1)
    lim.check("a")
    for d in ("c", "d"):
        lim.check(d)
    await clock.advance(1.0)  # everyone idle: full buckets are forgotten when over the cap
    lim.check("e")
    assert len(lim) == 1
    with pytest.raises(ValueError):
        DeviceRateLimiter(0)


def test_cluster_example_config_is_valid() -> None:
    from pymigrate.configload import load_toml

    path = Path(__file__).resolve().parents[2] / "configs" / "cloud-cluster.toml"
    cfg = parse_cloud_config(load_toml(str(path))["cloud"])
    assert cfg.listeners == ["amqp"] and cfg.rate_limit.backend == "redis"
    assert len(cfg.amqp["hosts"]) == 3 and cfg.amqp["queue_type"] == "quorum"
