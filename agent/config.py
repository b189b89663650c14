"""The agent's configuration: one TOML file, validated at start; errors name the key.

Phase one only (parse + validate into frozen structs); :mod:`agent.supervisor` builds the
heavy objects. Unknown keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import uuid
from pathlib import Path
from typing import Any

import msgspec

from agent.aggregate import AggregationConfig, parse_aggregation
from agent.buffer import BufferConfig
from agent.dedup import DedupConfig
from agent.retry import RetryConfig
from agent.timesync import TimeSyncConfig
from pymigrate.configload import convert, load_toml
from pymigrate.errors import ConfigError

_DEVICE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
PRIORITIES = ("critical", "high", "normal", "low")


class DeviceConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[device]``: identity and where state lives (relative to the start directory).

    ``id`` empty (the default) derives the identity from the machine
    (:func:`resolve_device_id`): two gateways started from one config never share an id
    by accident.
    """

    id: str = ""
    data_dir: str = "./var"

    def __post_init__(self) -> None:
        if self.id and not _DEVICE_RE.match(self.id):
            raise ConfigError("device.id",
                              f"{self.id!r} must be 1-128 chars of A-Z a-z 0-9 . _ : -")


class SensorPriority(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Maps sensor-name globs to a priority (first match wins)."""

    match: str
    priority: str = "normal"


class WeatherSource(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="weather",
                    tag_field="type"):
    """Simulated weather station: diurnal temperature, humidity, pressure, wind, rain..."""

    sensors: int = 10
    interval_s: float = 1.0
    seed: int = 1
    resolution: float = 0.1
    alarm_threshold: float | None = None  # temperature above this is sent as critical


class MqttSource(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="mqtt",
                 tag_field="type"):
    """Subscribe to a local broker; payloads are JSON or SenML (JSON/CBOR)."""

    host: str = "127.0.0.1"
    port: int = 1883
    topics: list[str] = msgspec.field(default_factory=lambda: ["sensors/#"])
    qos: int = 1
    client_id: str = ""
    username: str = ""
    password: str = ""
    format: str = "auto"  # auto | json | senml-json | senml-cbor
    max_payload_bytes: int = 262_144  # larger messages are refused unread (and acked)


class ReplaySource(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="replay",
                   tag_field="type"):
    """Replay a CSV dataset: first column a timestamp, every other numeric column a sensor."""

    path: str = ""
    speed: float = 0.0  # 0 = as fast as the pipeline takes it; 1 = real time
    shift_to_now: bool = False
    loop: bool = False  # start again at the end of the file (time-shifted to continue)
    exit_when_done: bool = False  # stop the agent (gracefully) at the end of the file


SourceConfig = WeatherSource | MqttSource | ReplaySource


class UplinkConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[uplink]``: ordered failover list of transports and their settings.

    ``[uplink.coap]``, ``[uplink.mqtt]``, ``[uplink.amqp]`` are validated against
    :mod:`transports.config` (keys documented there and in ``configs/agent-*.toml``).
    """

    transports: list[str] = msgspec.field(default_factory=lambda: ["coap"])
    coap: dict[str, Any] = msgspec.field(default_factory=dict)
    mqtt: dict[str, Any] = msgspec.field(default_factory=dict)
    amqp: dict[str, Any] = msgspec.field(default_factory=dict)


class ValidationConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[validation]``: what ingest rejects (with a counted reason)."""

    max_future_s: float = 300.0  # timestamps further ahead of now are implausible
    max_past_days: float = 3650.0
    allow_nan: bool = False
    strict_sensors: list[str] = msgspec.field(default_factory=list)  # non-empty = allow-list
    max_sensor_len: int = 128


class MetricsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[metrics]``: Prometheus text over HTTP and a health endpoint."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 9108


class LogConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[log]``: ``console`` for humans, ``json`` for journald/containers."""

    format: str = "console"
    level: str = "info"


class PipelineConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[pipeline]``: queue bounds and shutdown deadline."""

    queue_size: int = 64  # batches between stages (bounded: backpressure)
    drain_timeout_s: float = 10.0  # < systemd TimeoutStopSec
    status_interval_s: float = 5.0  # `pymigrate run` progress line period


class FirmwareConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[jobs.firmware]``: firmware jobs (``agent.firmware``): signed images fetched over
    HTTP(S), installed by a hook command (see configs/fleet/firmware/ab-slot.sh)."""

    enabled: bool = False
    verify_key: str = ""  # release key (Ed25519 public, PEM) that signs firmware images
    install_cmd: list[str] = msgspec.field(default_factory=list)  # + the image path
    health_cmd: list[str] = msgspec.field(default_factory=list)  # after install / restart
    rollback_cmd: list[str] = msgspec.field(default_factory=list)
    dir: str = "firmware"  # download directory, under device.data_dir when relative
    max_bytes: int = 64 * 1024 * 1024  # byte budget: larger images are refused
    health_delay_s: float = 5.0  # wait after the install before the health check
    cmd_timeout_s: float = 300.0  # a hook command running longer fails (killed)
    download_retries: int = 5  # resumed attempts after a broken download
    ca_file: str = ""  # HTTPS: CA bundle for the artifact server (default: system CAs)


class JobsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[jobs]``: the fleet jobs client (MQTT job topics of ``pymigrate fleet``)."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 1883
    prefix: str = "pymigrate"
    username: str = ""
    password: str = ""
    check_delay_s: float = 5.0  # after applying: first post-update health check
    health_interval_s: float = 30.0  # soak: health checks while the coordinator waits
    heartbeat_s: float = 60.0  # last-seen health report period (0 = off)
    max_backlog_bytes: int = 0  # unhealthy above this backlog (0 = no limit)
    ca_file: str = ""  # TLS to the broker: CA, client certificate and key (PEM)
    cert_file: str = ""
    key_file: str = ""
    verify_key: str = ""  # Ed25519 public key (PEM) of the coordinator: jobs must be signed
    allow_unsigned: bool = False  # accept unsigned jobs (only without verify_key; tests)
    secrets_file: str = ""  # TOML NAME = "value" resolving ${secret:NAME} in config jobs
    #: "pymigrate": <prefix>/jobs/<device>/... of `pymigrate fleet serve`; "aws-iot": the
    #: AWS IoT Jobs reserved topics $aws/things/<device id>/jobs/... (transports.jobs_aws)
    protocol: str = "pymigrate"
    firmware: FirmwareConfig = msgspec.field(default_factory=FirmwareConfig)


class AgentConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The whole agent configuration."""

    device: DeviceConfig = msgspec.field(default_factory=DeviceConfig)
    sources: list[SourceConfig] = msgspec.field(default_factory=list)
    priorities: list[SensorPriority] = msgspec.field(default_factory=list)
    validation: ValidationConfig = msgspec.field(default_factory=ValidationConfig)
    buffer: BufferConfig = msgspec.field(default_factory=BufferConfig)
    uplink: UplinkConfig = msgspec.field(default_factory=UplinkConfig)
    retry: RetryConfig = msgspec.field(default_factory=RetryConfig)
    dedup: DedupConfig = msgspec.field(default_factory=DedupConfig)
    timesync: TimeSyncConfig = msgspec.field(default_factory=TimeSyncConfig)
    aggregation: AggregationConfig = msgspec.field(default_factory=AggregationConfig)
    pipeline: PipelineConfig = msgspec.field(default_factory=PipelineConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    jobs: JobsConfig = msgspec.field(default_factory=JobsConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    source_file: str = ""

    def data_path(self, name: str) -> Path:
        """A state file under the device's data directory (relative to the start dir)."""
        p = Path(name)
        return p if p.is_absolute() else Path(self.device.data_dir) / p


AGENT_SECTIONS = {f for f in AgentConfig.__struct_fields__ if f != "source_file"}
IGNORED_SECTIONS = {"cloud", "fleet", "simulate"}  # other programs' sections in a shared file


def parse_agent_config(data: dict[str, Any], *, source_file: str = "") -> AgentConfig:
    """Validate a parsed TOML mapping into an AgentConfig (raises ConfigError)."""
    data = {k: v for k, v in data.items() if k not in IGNORED_SECTIONS}
    agg_data = data.pop("aggregation", None)
    if agg_data is not None and not isinstance(agg_data, dict):
        raise ConfigError("aggregation", f"must be a table, got {type(agg_data).__name__}")
    agg = parse_aggregation(agg_data)
    cfg = convert(data, AgentConfig)
    _check(cfg)
    return msgspec.structs.replace(cfg, aggregation=agg, source_file=source_file)


def load_agent_config(path: str | os.PathLike[str]) -> AgentConfig:
    return parse_agent_config(load_toml(str(path)), source_file=str(path))


def _at_least(value: float, low: float, key: str, note: str = "") -> None:
    if not (math.isfinite(value) and value >= low):
        raise ConfigError(key, f"must be a number >= {low:g}{f' ({note})' if note else ''}, "
                          f"got {value}")


def _check(cfg: AgentConfig) -> None:
    """Cross-field checks a type cannot express."""
    known = {"coap", "mqtt", "amqp"}
    if not cfg.uplink.transports:
        raise ConfigError("uplink.transports", "must name at least one transport")
    from transports.config import parse_transport

    for i, t in enumerate(cfg.uplink.transports):
        if t not in known:
            raise ConfigError(f"uplink.transports[{i}]",
                              f"unknown transport {t!r} (known: {', '.join(sorted(known))})")
        parse_transport(t, getattr(cfg.uplink, t), section="uplink")  # names uplink.<t>.<key>
    for i, p in enumerate(cfg.priorities):
        if p.priority not in PRIORITIES:
            raise ConfigError(f"priorities[{i}].priority",
                              f"{p.priority!r} is not one of {', '.join(PRIORITIES)}")
    for i, s in enumerate(cfg.sources):
        key = f"sources[{i}]"
        if isinstance(s, WeatherSource):
            if not 1 <= s.sensors <= 1000:
                raise ConfigError(f"{key}.sensors", f"must be in 1..1000, got {s.sensors}")
            if not (math.isfinite(s.interval_s) and s.interval_s > 0):
                raise ConfigError(f"{key}.interval_s", f"must be > 0, got {s.interval_s}")
        elif isinstance(s, MqttSource):
            if s.qos not in (0, 1, 2):
                raise ConfigError(f"{key}.qos", f"must be 0, 1 or 2, got {s.qos}")
            if s.format not in ("auto", "json", "senml-json", "senml-cbor"):
                raise ConfigError(f"{key}.format", f"unknown payload format {s.format!r}")
            if not 0 < s.port < 65536:
                raise ConfigError(f"{key}.port", f"must be a TCP port, got {s.port}")
            if not 64 <= s.max_payload_bytes <= 64 * 1024 * 1024:
                raise ConfigError(f"{key}.max_payload_bytes",
                                  f"must be in 64..67108864, got {s.max_payload_bytes}")
        elif isinstance(s, ReplaySource):
            if not s.path:
                raise ConfigError(f"{key}.path", "a replay source needs a CSV path")
            if not (math.isfinite(s.speed) and s.speed >= 0):
                raise ConfigError(f"{key}.speed", f"must be >= 0, got {s.speed}")
            if s.loop and s.exit_when_done:
                raise ConfigError(f"{key}.exit_when_done",
                                  "a looping replay never ends: set loop or exit_when_done")
    if cfg.log.format not in ("console", "json"):
        raise ConfigError("log.format", f"must be 'console' or 'json', got {cfg.log.format!r}")
    if cfg.log.level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError("log.level", f"unknown level {cfg.log.level!r}")
    if not 0 < cfg.jobs.port < 65536:
        raise ConfigError("jobs.port", f"must be a TCP port, got {cfg.jobs.port}")
    _at_least(cfg.jobs.check_delay_s, 0.0, "jobs.check_delay_s")
    _at_least(cfg.jobs.heartbeat_s, 0.0, "jobs.heartbeat_s", "0 = off")
    _at_least(cfg.jobs.health_interval_s, 0.01, "jobs.health_interval_s")
    if cfg.jobs.max_backlog_bytes < 0:
        raise ConfigError("jobs.max_backlog_bytes", "must be >= 0 (0 = no limit)")
    v = cfg.validation
    _at_least(v.max_future_s, 0.0, "validation.max_future_s")
    _at_least(v.max_past_days, 0.001, "validation.max_past_days")
    if not 1 <= v.max_sensor_len <= 65535:
        raise ConfigError("validation.max_sensor_len", f"must be in 1..65535, got "
                          f"{v.max_sensor_len}")
    if cfg.jobs.protocol not in ("pymigrate", "aws-iot"):
        raise ConfigError("jobs.protocol", f"must be 'pymigrate' or 'aws-iot', got "
                          f"{cfg.jobs.protocol!r}")
    if (cfg.jobs.enabled and cfg.jobs.protocol == "pymigrate" and not cfg.jobs.verify_key
            and not cfg.jobs.allow_unsigned):
        raise ConfigError("jobs.verify_key", "fleet jobs need the coordinator's Ed25519 public"
                          " key (PEM) to verify job signatures; set allow_unsigned = true only"
                          " on a trusted test network")
    fw = cfg.jobs.firmware
    if fw.enabled and not fw.verify_key:
        raise ConfigError("jobs.firmware.verify_key", "firmware jobs need the release key"
                          " (Ed25519 public key, PEM) that signs firmware images")
    if fw.enabled and not fw.install_cmd:
        raise ConfigError("jobs.firmware.install_cmd", "firmware jobs need an install hook"
                          " command, e.g. [\"/usr/lib/pymigrate/ab-slot.sh\", \"install\"]")
    if fw.max_bytes < 1:
        raise ConfigError("jobs.firmware.max_bytes", "must be >= 1 (bytes)")
    _at_least(fw.health_delay_s, 0.0, "jobs.firmware.health_delay_s")
    _at_least(fw.cmd_timeout_s, 0.1, "jobs.firmware.cmd_timeout_s")
    if fw.download_retries < 0:
        raise ConfigError("jobs.firmware.download_retries", "must be >= 0")
    if cfg.jobs.key_file and not cfg.jobs.cert_file:
        raise ConfigError("jobs.cert_file", "a key_file needs its cert_file")
    if cfg.pipeline.queue_size < 1:
        raise ConfigError("pipeline.queue_size", "must be >= 1")
    if not (math.isfinite(cfg.pipeline.drain_timeout_s) and cfg.pipeline.drain_timeout_s >= 0):
        raise ConfigError("pipeline.drain_timeout_s", "must be >= 0")
    if not (math.isfinite(cfg.pipeline.status_interval_s)
            and cfg.pipeline.status_interval_s >= 0.1):
        raise ConfigError("pipeline.status_interval_s",
                          f"must be >= 0.1 (seconds between progress lines), "
                          f"got {cfg.pipeline.status_interval_s}")
    if not 0 <= cfg.metrics.port < 65536:
        raise ConfigError("metrics.port", f"must be a TCP port (0 = any free one), "
                          f"got {cfg.metrics.port}")
    if not cfg.metrics.host:
        raise ConfigError("metrics.host", "must be an address (127.0.0.1 = this machine only)")


def resolve_device_id(cfg: AgentConfig, *, machine_id_file: str = "/etc/machine-id") -> AgentConfig:
    """Phase two of ``device.id``: an empty id becomes ``gw-<12 hex>`` derived from the
    machine id (systemd's ``/etc/machine-id``), or, where there is none, generated once
    and kept in ``<data_dir>/device-id``. A configured id is returned unchanged."""
    if cfg.device.id:
        return cfg
    try:
        machine = Path(machine_id_file).read_text(encoding="ascii").strip()
    except (OSError, ValueError):
        machine = ""
    if machine:
        dev = "gw-" + hashlib.sha256(f"pymigrate:{machine}".encode()).hexdigest()[:12]
    else:
        kept = cfg.data_path("device-id")
        try:
            dev = kept.read_text(encoding="ascii").strip()
        except (OSError, ValueError):
            dev = ""
        if not _DEVICE_RE.match(dev):
            dev = "gw-" + uuid.uuid4().hex[:12]
            kept.parent.mkdir(parents=True, exist_ok=True)
            kept.write_text(dev + "\n", encoding="ascii")
    return msgspec.structs.replace(cfg, device=msgspec.structs.replace(cfg.device, id=dev))
