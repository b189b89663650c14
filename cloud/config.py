"""Cloud ingest config: phase one parses and validates (frozen structs, errors name the
key), phase two (:func:`build_store`, :func:`build_ingest`) creates the heavy objects.

TOML (every key optional; defaults shown)::

    [cloud]
    store = "sqlite"              # sqlite | postgres | influx | timestream
    listeners = ["coap"]          # coap | mqtt | amqp (transport settings: transports.config)
    max_batch_bytes = 16777216

    [cloud.sqlite]
    path = "cloud.db"

    [cloud.postgres]
    dsn = "postgresql://postgres@127.0.0.1:5432/pymigrate"
    schema = "public"
    pool_min = 1
    pool_max = 4
    bulk = "copy"                 # copy | unnest
    command_timeout_s = 30.0
    timescale = "auto"            # auto: hypertable when TimescaleDB can run, else plain
                                  # tables + one warning; on: error if not; off: never
    chunk_interval_h = 24.0       # TimescaleDB: hypertable chunk width
    compress_after_h = 168.0      # compress chunks this old (0 = no compression policy)
    retention_days = 0.0          # drop chunks this old (0 = keep everything)
    continuous_aggregate = true   # readings_1h (hourly min/max/avg/sum/count), --agg 1h

    [cloud.influx]
    url = "http://127.0.0.1:8086"
    version = 1                   # 1: /write?db=  2: /api/v2/write?org=&bucket=
    db = "pymigrate"              # v1 database (rp optional)
    token = ""                    # v2 (or v1 with auth): "Authorization: Token ..."
    org = ""
    bucket = ""                   # v2; defaults to db
    ledger_path = "influx-ledger.db"   # idempotency ledger: a SQLite file on this host, or
    ledger_dsn = ""                    # PostgreSQL for replicas on several hosts
    ledger_schema = "pymigrate_ledger"

    [cloud.timestream]
    database = "pymigrate"
    table = "readings"
    region = "us-east-1"
    ledger_path = "timestream-ledger.db"
    ledger_dsn = ""               # as for influx
    ledger_schema = "pymigrate_ledger"
    create = false                # create the table (magnetic-store writes on) / update it
    memory_retention_h = 24       # memory store; older records go to the magnetic store
    magnetic_retention_days = 3650
    rejected_data_bucket = ""     # S3 bucket for AWS's asynchronous magnetic rejections

    [cloud.coap]
    host = "0.0.0.0"
    port = 5683

    [cloud.dedup]
    # conflict_policy = "first"   # off by default; first | last | best_quality | average
    gateway_tolerance_ms = 0      # > 0 turns on redundant-gateway dedup
    gateway_policy = "first"      # replacing policies need a SQL store (sqlite, postgres)

    [cloud.rate_limit]
    batches_per_s = 0.0           # per device; 0 = off
    burst = 10
    backend = "memory"            # memory: per replica | redis: shared by all replicas
    redis_url = "redis://127.0.0.1:6379/0"
    key_prefix = "pymigrate:rl:"
    timeout_s = 0.5               # per Redis call; a failed call lets the batch through
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

import msgspec

from cloud.dedup import ConflictPolicy, GatewayDeduper
from cloud.ratelimit import DeviceRateLimiter
from cloud.stores.base import Store
from pymigrate.clock import Clock
from pymigrate.configload import convert
from pymigrate.envelope import DEFAULT_MAX_BYTES
from pymigrate.errors import ConfigError

__all__ = ["CloudConfig", "CoapListener", "DedupSettings", "InfluxSettings",
           "PostgresSettings", "RateLimitSettings", "SqliteSettings", "TimestreamSettings",
           "build_ingest", "build_store", "parse_cloud_config"]



def _number(value: float, key: str, *, low: float = 0.0, strict: bool = True) -> None:
    """``value`` is finite and > ``low`` (``strict``) or >= ``low``; else ConfigError."""
    ok = math.isfinite(value) and (value > low if strict else value >= low)
    if not ok:
        raise ConfigError(key, f"must be a number {'>' if strict else '>='} {low:g}, "
                          f"got {value}")


class SqliteSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    path: str = "cloud.db"
    busy_timeout_ms: int = 10_000

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("cloud.sqlite.path", "must name the store file")
        _number(self.busy_timeout_ms, "cloud.sqlite.busy_timeout_ms", strict=False)


class PostgresSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    dsn: str = "postgresql://postgres@127.0.0.1:5432/pymigrate"
    schema: str = "public"
    pool_min: int = 1
    pool_max: int = 4
    bulk: Literal["copy", "unnest"] = "copy"
    command_timeout_s: float = 30.0
    connect_timeout_s: float = 5.0
    timescale: Literal["auto", "on", "off"] = "auto"
    chunk_interval_h: float = 24.0
    compress_after_h: float = 168.0
    retention_days: float = 0.0
    continuous_aggregate: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.pool_min <= self.pool_max:
            raise ConfigError("cloud.postgres.pool_max", "need 1 <= pool_min <= pool_max")
        _number(self.command_timeout_s, "cloud.postgres.command_timeout_s")
        _number(self.connect_timeout_s, "cloud.postgres.connect_timeout_s")
        _number(self.chunk_interval_h, "cloud.postgres.chunk_interval_h")
        _number(self.compress_after_h, "cloud.postgres.compress_after_h", strict=False)
        _number(self.retention_days, "cloud.postgres.retention_days", strict=False)


class InfluxSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    url: str = "http://127.0.0.1:8086"
    version: Literal[1, 2] = 1
    db: str = "pymigrate"
    rp: str = ""
    token: str = ""
    org: str = ""
    bucket: str = ""
    username: str = ""
    password: str = ""
    measurement: str = "readings"
    ledger_path: str = "influx-ledger.db"
    ledger_dsn: str = ""  # PostgreSQL: one ledger for replicas on every host
    ledger_schema: str = "pymigrate_ledger"
    max_retries: int = 5
    timeout_s: float = 10.0
    max_lines: int = 20_000

    def __post_init__(self) -> None:
        if self.version == 2 and not (self.org and (self.bucket or self.db)):
            raise ConfigError("cloud.influx.org", "InfluxDB 2 needs org and bucket")
        _number(self.max_retries, "cloud.influx.max_retries", strict=False)
        _number(self.timeout_s, "cloud.influx.timeout_s")
        _number(self.max_lines, "cloud.influx.max_lines", low=1, strict=False)
        _check_ledger("influx", self.ledger_dsn, self.ledger_schema)


class TimestreamSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    database: str = "pymigrate"
    table: str = "readings"
    region: str = "us-east-1"
    ledger_path: str = "timestream-ledger.db"
    ledger_dsn: str = ""  # PostgreSQL: one ledger for replicas on every host
    ledger_schema: str = "pymigrate_ledger"
    create: bool = False
    memory_retention_h: int = 24
    magnetic_retention_days: int = 3650
    rejected_data_bucket: str = ""

    def __post_init__(self) -> None:
        # the ranges CreateTable accepts
        if not 1 <= self.memory_retention_h <= 8766:
            raise ConfigError("cloud.timestream.memory_retention_h", "must be in 1..8766")
        if not 1 <= self.magnetic_retention_days <= 73000:
            raise ConfigError("cloud.timestream.magnetic_retention_days",
                              "must be in 1..73000")
        _check_ledger("timestream", self.ledger_dsn, self.ledger_schema)


def _check_ledger(section: str, dsn: str, schema: str) -> None:
    if dsn and not dsn.startswith(("postgresql://", "postgres://")):
        raise ConfigError(f"cloud.{section}.ledger_dsn",
                          f"must be a postgresql:// URL (or empty: a SQLite file), got {dsn!r}")
    if not re.match(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$", schema):
        raise ConfigError(f"cloud.{section}.ledger_schema",
                          f"must be a plain SQL identifier, got {schema!r}")


def _ledger(dsn: str, schema: str) -> Any:
    """A PostgreSQL ledger when ``dsn`` is set (else None: the store's SQLite file)."""
    if not dsn:
        return None
    from cloud.stores.ledger_pg import PgLedger

    return PgLedger(dsn, schema=schema)


class CoapListener(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    host: str = "0.0.0.0"
    port: int = 5683

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError("cloud.coap.port", f"must be in 1..65535, got {self.port}")


class DedupSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # None (default): every distinct sequence number is stored, even two values at one
    # instant (real feeds have duplicate timestamps); a policy resolves them instead
    conflict_policy: ConflictPolicy | None = None
    gateway_policy: ConflictPolicy = ConflictPolicy.FIRST
    gateway_tolerance_ms: int = 0
    gateway_match_values: bool = True
    gateway_value_tol: float = 0.0

    def __post_init__(self) -> None:
        if self.gateway_tolerance_ms < 0:
            raise ConfigError("cloud.dedup.gateway_tolerance_ms", "must be >= 0")
        _number(self.gateway_value_tol, "cloud.dedup.gateway_value_tol", strict=False)


class RateLimitSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    batches_per_s: float = 0.0
    burst: int = 10
    # memory: each replica limits on its own (N replicas allow N times the rate);
    # redis: one bucket per device shared by every replica (cloud.ratelimit_redis)
    backend: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "pymigrate:rl:"
    timeout_s: float = 0.5

    def __post_init__(self) -> None:
        if self.batches_per_s < 0 or self.burst < 1:
            raise ConfigError("cloud.rate_limit", "batches_per_s >= 0 and burst >= 1")
        _number(self.batches_per_s, "cloud.rate_limit.batches_per_s", strict=False)
        _number(self.timeout_s, "cloud.rate_limit.timeout_s")
        if self.backend == "redis" and not self.redis_url.startswith(
                ("redis://", "rediss://", "unix://")):
            raise ConfigError("cloud.rate_limit.redis_url",
                              f"must be a redis://, rediss:// or unix:// URL, got "
                              f"{self.redis_url!r}")


class CloudConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Everything ``pymigrate cloud`` needs; see the module docstring for the TOML."""

    store: Literal["sqlite", "postgres", "influx", "timestream"] = "sqlite"
    sqlite: SqliteSettings = msgspec.field(default_factory=SqliteSettings)
    postgres: PostgresSettings = msgspec.field(default_factory=PostgresSettings)
    influx: InfluxSettings = msgspec.field(default_factory=InfluxSettings)
    timestream: TimestreamSettings = msgspec.field(default_factory=TimestreamSettings)
    listeners: list[Literal["coap", "mqtt", "amqp"]] = msgspec.field(
        default_factory=lambda: ["coap"])
    coap: CoapListener = msgspec.field(default_factory=CoapListener)
    # listener settings for MQTT / AMQP: the keys of transports.config.MqttConfig /
    # AmqpConfig (validated below, errors name cloud.mqtt.<key>)
    mqtt: dict[str, Any] = msgspec.field(default_factory=dict)
    amqp: dict[str, Any] = msgspec.field(default_factory=dict)
    dedup: DedupSettings = msgspec.field(default_factory=DedupSettings)
    max_batch_bytes: int = DEFAULT_MAX_BYTES
    rate_limit: RateLimitSettings = msgspec.field(default_factory=RateLimitSettings)
    # how often the running ingest accounts every stream for the completeness metrics
    # (0 = never; `pymigrate cloud completeness` works either way)
    completeness_interval_s: float = 300.0
    # refuse readings whose (corrected) timestamp is further ahead of the cloud's clock
    max_future_s: float = 86_400.0
    # keep NaN/inf values (the agent's validation.allow_nan); SQLite holds NaN as NULL
    allow_non_finite: bool = False

    def __post_init__(self) -> None:
        from transports.config import parse_transport

        if not (math.isfinite(self.max_future_s) and self.max_future_s > 0):
            raise ConfigError("cloud.max_future_s", f"must be > 0, got {self.max_future_s}")
        if not 0 <= self.completeness_interval_s <= 86_400 * 7:
            raise ConfigError("cloud.completeness_interval_s",
                              f"must be 0 (off) .. 604800 seconds, got "
                              f"{self.completeness_interval_s}")

        if not self.listeners:
            raise ConfigError("cloud.listeners", "must name at least one of coap, mqtt, amqp")
        if len(set(self.listeners)) != len(self.listeners):
            raise ConfigError("cloud.listeners", f"names a listener twice: {self.listeners}")
        for name in ("mqtt", "amqp"):
            if name in self.listeners or getattr(self, name):
                parse_transport(name, getattr(self, name), section="cloud")
        if self.max_batch_bytes < 1024:
            raise ConfigError("cloud.max_batch_bytes", "must be >= 1024")
        if (self.store in ("influx", "timestream") and self.dedup.gateway_tolerance_ms
                and self.dedup.gateway_policy is not ConflictPolicy.FIRST):
            raise ConfigError("cloud.dedup.gateway_policy",
                              f"{self.store} cannot delete a stored copy: use 'first'")


def parse_cloud_config(data: dict[str, Any], *, section: str = "cloud") -> CloudConfig:
    """Validate the ``[cloud]`` table; raises ConfigError naming the key."""
    return convert(data, CloudConfig, section=section)


def build_store(cfg: CloudConfig, *, clock: Clock | None = None) -> Store:
    """The configured store, not yet opened."""
    if cfg.store == "postgres":
        from cloud.stores.postgres import PostgresStore
        from cloud.stores.timescale import TimescaleOptions

        p = cfg.postgres
        opts = TimescaleOptions(chunk_interval_ms=round(p.chunk_interval_h * 3_600_000),
                                compress_after_ms=round(p.compress_after_h * 3_600_000),
                                retention_ms=round(p.retention_days * 86_400_000),
                                aggregate=p.continuous_aggregate)
        return PostgresStore(p.dsn, schema=p.schema, pool_min=p.pool_min, pool_max=p.pool_max,
                             bulk=p.bulk, command_timeout_s=p.command_timeout_s,
                             connect_timeout_s=p.connect_timeout_s, timescale=p.timescale,
                             timescale_options=opts)
    if cfg.store == "influx":
        from cloud.stores.influx import InfluxStore

        i = cfg.influx
        return InfluxStore(i.url, version=i.version, db=i.db, rp=i.rp, token=i.token,
                           org=i.org, bucket=i.bucket, username=i.username,
                           password=i.password, measurement=i.measurement,
                           ledger_path=i.ledger_path,
                           ledger=_ledger(i.ledger_dsn, i.ledger_schema), clock=clock,
                           max_retries=i.max_retries,
                           timeout_s=i.timeout_s, max_lines=i.max_lines)
    if cfg.store == "timestream":
        from cloud.stores.timestream import TimestreamStore

        t = cfg.timestream
        return TimestreamStore(t.database, t.table, region=t.region,
                               ledger_path=t.ledger_path,
                               ledger=_ledger(t.ledger_dsn, t.ledger_schema), create=t.create,
                               memory_retention_h=t.memory_retention_h,
                               magnetic_retention_days=t.magnetic_retention_days,
                               rejected_data_bucket=t.rejected_data_bucket)
    from cloud.stores.sqlite import SqliteStore

    return SqliteStore(cfg.sqlite.path, busy_timeout_ms=cfg.sqlite.busy_timeout_ms)


def build_ingest(cfg: CloudConfig, store: Store, *, clock: Clock | None = None) -> Any:
    """An :class:`~cloud.ingest.IngestService` over ``store`` with the dedup and rate
    limit settings applied."""
    from cloud.ingest import IngestService

    d = cfg.dedup
    gateway = None
    if d.gateway_tolerance_ms > 0:
        gateway = GatewayDeduper(d.gateway_tolerance_ms, d.gateway_policy,
                                 match_values=d.gateway_match_values,
                                 value_tol=d.gateway_value_tol)
    limiter: Any = None
    rl = cfg.rate_limit
    if rl.batches_per_s > 0 and rl.backend == "redis":
        from cloud.ratelimit_redis import RedisRateLimiter

        limiter = RedisRateLimiter(rl.batches_per_s, rl.burst, url=rl.redis_url,
                                   key_prefix=rl.key_prefix, timeout_s=rl.timeout_s)
    elif rl.batches_per_s > 0:
        limiter = DeviceRateLimiter(rl.batches_per_s, rl.burst, clock=clock)
    return IngestService(store, clock=clock, max_batch_bytes=cfg.max_batch_bytes,
                         max_future_s=cfg.max_future_s, allow_non_finite=cfg.allow_non_finite,
                         limiter=limiter, gateway=gateway, conflict_policy=d.conflict_policy)
