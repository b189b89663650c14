"""MQTT subscription source: JSON or SenML (JSON/CBOR) payloads from local sensors.

Accepted JSON shapes (``format = "json"`` or auto-detected):

* ``{"sensor": "t1", "value": 21.5, "ts": 1767225600000}`` (``ts`` ms, s or ISO 8601;
  missing = now), optional ``"priority": "critical"``;
* a list of such objects;
* ``{"ts": ..., "t1": 21.5, "h1": 40}`` (many sensors, one timestamp);
* ``{"value": 21.5}`` or a bare number: the sensor is the topic's last segment.

SenML packs (RFC 8428) are recognised by a JSON array of records with ``n``/``bn`` keys or by
a CBOR payload. Anything else is rejected with a counted reason and still acknowledged (a
poison message must not be redelivered forever).
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import msgspec
import structlog

from agent.config import MqttSource
from agent.sources.base import Emit, SourceBatch
from agent.sources.replay import parse_timestamp
from pymigrate.clock import Clock
from pymigrate.errors import DecodeError, TransportError
from pymigrate.senml import parse_senml
from pymigrate.types import Priority, Reading
from transports.mqtt_source import MqttSubscriber

log = structlog.get_logger("pymigrate.agent.source.mqtt")
_json = msgspec.json.Decoder()


def _num(v: Any) -> float:
    if isinstance(v, bool):
        return 1.0 if v else 0.0
    if isinstance(v, int | float):
        return float(v)
    raise ValueError("non_numeric")


def _ts(v: Any, now_ms: int) -> int:
    if v is None:
        return now_ms
    if isinstance(v, int | float) and not isinstance(v, bool):
        if not math.isfinite(v):
            raise ValueError("bad_timestamp")
        return parse_timestamp(repr(v))
    if isinstance(v, str):
        return parse_timestamp(v)
    raise ValueError("bad_timestamp")


def payload_has_time(data: bytes) -> bool:
    """True when a payload may carry its own timestamps (then they are kept as given).

    JSON: a time key is present; a bare number: no; CBOR (SenML): assumed yes.
    """
    head = data.lstrip()[:1]
    if head in (b"{", b"["):
        return any(k in data for k in (b'"ts"', b'"t"', b'"time"', b'"bt"'))
    return not (head.isdigit() or head == b"-")


def parse_json_payload(data: bytes, *, topic: str, device_id: str,
                       now_ms: int) -> tuple[list[Reading], list[tuple[str, str]]]:
    """Parse one JSON payload (shapes in the module docstring) -> (readings, rejects)."""
    try:
        doc = _json.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return [], [("malformed_json", topic)]
    default_sensor = topic.rsplit("/", 1)[-1] or "value"
    items = doc if isinstance(doc, list) else [doc]
    out: list[Reading] = []
    rejects: list[tuple[str, str]] = []
    for item in items:
        try:
            if isinstance(item, int | float) and not isinstance(item, bool):
                out.append(Reading(device_id, default_sensor, now_ms, _num(item)))
                continue
            if not isinstance(item, dict):
                raise ValueError("unsupported_shape")
            prio = Priority.parse(item.get("priority", "normal"))
            ts = _ts(item.get("ts", item.get("t", item.get("time"))), now_ms)
            if "value" in item or "v" in item:
                sensor = str(item.get("sensor", item.get("n", default_sensor)))
                out.append(Reading(device_id, sensor, ts,
                                   _num(item.get("value", item.get("v"))), priority=prio))
            else:
                skip = {"ts", "t", "time", "priority", "device"}
                fields = [(k, v) for k, v in item.items() if k not in skip]
                if not fields:
                    raise ValueError("no_values")
                for k, v in fields:
                    out.append(Reading(device_id, str(k), ts, _num(v), priority=prio))
        except ValueError as exc:
            reason = str(exc) if str(exc).isidentifier() else "invalid_field"
            rejects.append((reason, topic))
    return out, rejects


def parse_payload(data: bytes, *, fmt: str, topic: str, device_id: str,
                  now_ms: int) -> tuple[list[Reading], list[tuple[str, str]]]:
    """Dispatch on the configured or detected format."""
    if fmt == "auto":
        head = data.lstrip()[:1]
        if head in (b"{", b"[") or head[:1].isdigit() or head[:1] == b"-":
            fmt = "senml-json" if head == b"[" and (b'"n"' in data or b'"bn"' in data) \
                else "json"
        else:
            fmt = "senml-cbor"
    if fmt == "json":
        return parse_json_payload(data, topic=topic, device_id=device_id, now_ms=now_ms)
    try:
        rs = parse_senml(data, content_format="json" if fmt == "senml-json" else "cbor",
                         device_id=device_id, now_ms=now_ms)
    except DecodeError as exc:
        return [], [(f"senml_{exc.reason}", topic)]
    return rs, []


class MqttSourceStage:
    """Subscribes and emits; reconnects with a capped backoff when the broker goes away."""

    name = "mqtt"

    def __init__(self, cfg: MqttSource, *, device_id: str, clock: Clock) -> None:
        self.cfg = cfg
        self.device_id = device_id
        self.clock = clock
        self.sub = MqttSubscriber(cfg.host, cfg.port, cfg.topics, qos=cfg.qos,
                                  client_id=cfg.client_id, username=cfg.username,
                                  password=cfg.password)
        self.messages = 0
        self.connected = asyncio.Event()

    async def run(self, emit: Emit) -> None:
        delay = 0.5
        while True:
            try:
                async with self.sub.session() as messages:
                    self.connected.set()
                    delay = 0.5
                    async for topic, payload, ack in messages:
                        self.messages += 1
                        rs, rejects = parse_payload(payload, fmt=self.cfg.format, topic=topic,
                                                    device_id=self.device_id,
                                                    now_ms=self.clock.time_ms())
                        await emit(SourceBatch(rs, ack=ack, rejects=rejects,
                                               local_clock=not payload_has_time(payload)))
            except TransportError as exc:
                self.connected.clear()
                log.warning("mqtt source disconnected", error=str(exc), retry_in_s=delay)
                await self.clock.sleep(delay)
                delay = min(delay * 2, 30.0)
