"""MQTT subscription source: JSON or SenML (JSON/CBOR) payloads from local sensors.

Accepted JSON shapes (``format = "json"`` or auto-detected):

* ``{"sensor": "t1", "value": 21.5, "ts": 1767225600000}`` (``ts`` ms, s or ISO 8601;
  missing = now), optional ``"priority": "critical"``;
* a list of such objects;
* ``{"ts": ..., "t1": 21.5, "h1": 40}`` (many sensors, one timestamp);
* ``{"value": 21.5}`` or a bare number: the sensor is the topic's last segment.

SenML packs (RFC 8428) are recognised by a JSON array of records with ``n``/``bn`` keys or by
a CBOR payload. Anything else is rejected with a counted reason and still acknowledged (a
poison message must not be redelivered forever): ``payload_too_large`` (over
``max_payload_bytes``, checked before decoding), ``plain_text``, ``invalid_utf8``,
``unknown_format``, ``malformed_json``, ``unsupported_shape`` (a nested value: refused at
its first level, so deep nesting costs nothing), ``too_many_values`` (over 10,000 in one
message), ``number_out_of_range``, and per item ``non_numeric``, ``invalid_timestamp``,
``invalid_priority``, ``invalid_sensor``, ``no_values``; SenML's own reasons are
prefixed ``senml_``.
"""

from __future__ import annotations

import asyncio
import math
from typing import Annotated, Any

import msgspec
import structlog
import xxhash

from agent.config import MqttSource
from agent.sources.base import Emit, SourceBatch
from agent.sources.replay import parse_timestamp
from pymigrate.clock import Clock
from pymigrate.errors import DecodeError, TransportError
from pymigrate.senml import parse_senml
from pymigrate.types import Priority, Reading
from transports.mqtt_source import MqttSubscriber

log = structlog.get_logger("pymigrate.agent.source.mqtt")

DEFAULT_MAX_PAYLOAD_BYTES = 256 * 1024  # [[sources]] max_payload_bytes
MAX_READINGS = 10_000  # per message (a list, or the sensors of one object)

_Scalar = str | int | float | bool | None
_Object = Annotated[dict[str, _Scalar], msgspec.Meta(max_length=MAX_READINGS)]
# The shapes we accept, typed: a nested value fails at its first level, so a payload of
# 100,000 nested lists is refused at once (no recursion, no deep object tree).
_Doc = float | Annotated[list[float | _Object], msgspec.Meta(max_length=MAX_READINGS)] | _Object
_json = msgspec.json.Decoder(_Doc)
_JSON_START = frozenset(b'{["-0123456789')
_I64 = 2**63
# a message of MAX_READINGS objects of up to 8 keys: more commas means too many values,
# refused before decoding so a large max_payload_bytes cannot make a large object tree
_MAX_COMMAS = MAX_READINGS * 8


class _Reject(Exception):
    """One item refused with a counted reason code."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _num(v: Any) -> float:
    if isinstance(v, bool):
        return 1.0 if v else 0.0
    if isinstance(v, int | float):
        return float(v)
    raise _Reject("non_numeric")


def _ts(v: Any, now_ms: int) -> int:
    if v is None:
        return now_ms
    try:
        if isinstance(v, int | float) and not isinstance(v, bool):
            if not math.isfinite(v):
                raise ValueError(v)
            ts = parse_timestamp(repr(v))
        elif isinstance(v, str):
            ts = parse_timestamp(v)
        else:
            raise ValueError(v)
    except (ValueError, OverflowError):
        raise _Reject("invalid_timestamp") from None
    if not -_I64 <= ts < _I64:
        raise _Reject("invalid_timestamp")
    return ts


def _priority(v: Any) -> Priority:
    if isinstance(v, bool) or not isinstance(v, str | int):
        raise _Reject("invalid_priority")
    try:
        return Priority.parse(v)
    except ValueError:
        raise _Reject("invalid_priority") from None


def _sensor(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    raise _Reject("invalid_sensor")


def payload_has_time(data: bytes) -> bool:
    """True when a payload may carry its own timestamps (then they are kept as given).

    JSON: a time key is present; a bare number: no; CBOR (SenML): assumed yes.
    """
    head = data.lstrip()[:1]
    if head in (b"{", b"["):
        return any(k in data for k in (b'"ts"', b'"t"', b'"time"', b'"bt"'))
    return not (head.isdigit() or head == b"-")


def _not_json(data: bytes) -> str:
    """The reason for a payload that does not decode as JSON."""
    head = data.lstrip()[:1]
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return "invalid_utf8" if head and head[0] in _JSON_START else "unknown_format"
    return "malformed_json" if head and head[0] in _JSON_START else "plain_text"


def parse_json_payload(data: bytes, *, topic: str, device_id: str,
                       now_ms: int) -> tuple[list[Reading], list[tuple[str, str]]]:
    """Parse one JSON payload (shapes in the module docstring) -> (readings, rejects)."""
    if data.count(b",") > _MAX_COMMAS:  # counted in C before any object is made
        return [], [("too_many_values", topic)]
    try:
        doc = _json.decode(data)
    except UnicodeDecodeError:
        return [], [("invalid_utf8", topic)]
    except msgspec.ValidationError as exc:
        msg = str(exc)
        reason = ("number_out_of_range" if "out of range" in msg
                  else "too_many_values" if "length <=" in msg else "unsupported_shape")
        return [], [(reason, topic)]
    except msgspec.DecodeError:
        return [], [(_not_json(data), topic)]
    default_sensor = topic.rsplit("/", 1)[-1] or "value"
    items = doc if isinstance(doc, list) else [doc]
    out: list[Reading] = []
    rejects: list[tuple[str, str]] = []
    for item in items:
        try:
            if isinstance(item, float):
                out.append(Reading(device_id, default_sensor, now_ms, item))
                continue
            prio = _priority(item.get("priority", "normal"))
            ts = _ts(item.get("ts", item.get("t", item.get("time"))), now_ms)
            if "value" in item or "v" in item:
                sensor = _sensor(item.get("sensor", item.get("n", default_sensor)))
                out.append(Reading(device_id, sensor, ts,
                                   _num(item.get("value", item.get("v"))), priority=prio))
            else:
                skip = {"ts", "t", "time", "priority", "device"}
                fields = [(k, v) for k, v in item.items() if k not in skip]
                if not fields:
                    raise _Reject("no_values")
                for k, v in fields:
                    try:
                        out.append(Reading(device_id, k, ts, _num(v), priority=prio))
                    except _Reject as exc:  # one bad sensor does not sink its siblings
                        rejects.append((exc.reason, f"{topic}:{k}"))
        except _Reject as exc:
            rejects.append((exc.reason, topic))
    return out, rejects


def detect_format(data: bytes) -> str:
    """``json``, ``senml-json``, ``senml-cbor`` or ``unknown`` for ``format = "auto"``."""
    head = data.lstrip()[:1]
    if head and head[0] in _JSON_START:
        return "senml-json" if head == b"[" and (b'"n"' in data or b'"bn"' in data) else "json"
    if data and 0x80 <= data[0] <= 0xDB:  # CBOR array, map or tag: SenML CBOR decides
        return "senml-cbor"
    return "unknown"


def message_key(topic: str, mid: int, payload: bytes) -> int:
    """Identity of one MQTT message as a broker redelivers it (same packet identifier)."""
    return xxhash.xxh3_64_intdigest(f"{topic}\x00{mid}\x00".encode() + payload)


def parse_payload(data: bytes, *, fmt: str, topic: str, device_id: str, now_ms: int,
                  max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
                  ) -> tuple[list[Reading], list[tuple[str, str]]]:
    """Dispatch on the configured or detected format. Never raises on any input: every
    refusal is a (reason, detail) pair and the message is still acknowledged."""
    if len(data) > max_bytes:
        return [], [("payload_too_large", f"{topic}: {len(data)} bytes > {max_bytes}")]
    if fmt == "auto":
        fmt = detect_format(data)
        if fmt == "unknown":
            return [], [(_not_json(data), topic)]
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
                    async for topic, payload, ack, mid in messages:
                        self.messages += 1
                        rs, rejects = parse_payload(payload, fmt=self.cfg.format, topic=topic,
                                                    device_id=self.device_id,
                                                    now_ms=self.clock.time_ms(),
                                                    max_bytes=self.cfg.max_payload_bytes)
                        stamped = not payload_has_time(payload)
                        # readings stamped on arrival differ at each delivery: the edge
                        # dedup knows a redelivery by the message (topic, packet id, body)
                        key = message_key(topic, mid, payload) if stamped and mid else None
                        await emit(SourceBatch(rs, ack=ack, rejects=rejects,
                                               local_clock=stamped, msg_key=key))
            except TransportError as exc:
                self.connected.clear()
                log.warning("mqtt source disconnected", error=str(exc), retry_in_s=delay)
                await self.clock.sleep(delay)
                delay = min(delay * 2, 30.0)
