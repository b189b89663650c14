"""Typed, frozen transport configs (phase one of two-phase config: parse and validate).

Each struct is tagged by ``type`` (``"mqtt"``, ``"coap"``, ``"amqp"``) so an ordered
failover list can be written as TOML array-of-tables::

    [[uplink.transports]]
    type = "mqtt"
    host = "broker.example"
    ca_file = "/etc/pymigrate/ca.pem"

    [[uplink.transports]]
    type = "coap"
    host = "ingest.example"

Validation errors are :class:`ConfigError` naming ``uplink.<type>.<key>``. Heavy objects
(TLS contexts, clients) are built later by :mod:`transports.registry`.
"""

from __future__ import annotations

from typing import Any

import msgspec

from pymigrate.configload import convert
from pymigrate.errors import ConfigError

__all__ = ["AmqpConfig", "CoapConfig", "MqttConfig", "TransportConfig", "parse_endpoint",
           "parse_transport", "parse_transports"]

_MAX_PAYLOAD = 256 * 1024


def _check_port(kind: str, port: int) -> None:
    if not 0 < port < 65536:
        raise ConfigError(f"uplink.{kind}.port", f"must be in 1..65535, got {port}")


def _check_positive(kind: str, key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"uplink.{kind}.{key}", f"must be > 0, got {value}")


def _check_tls(kind: str, cert_file: str, key_file: str) -> None:
    if key_file and not cert_file:
        raise ConfigError(f"uplink.{kind}.key_file", "set cert_file too (key without cert)")


def _check_segment(kind: str, key: str, value: str, *, slash_ok: bool) -> None:
    bad = "+#" if slash_ok else "+#/"
    if not value or value.strip("/") != value or any(c in value for c in bad):
        raise ConfigError(f"uplink.{kind}.{key}",
                          f"must be a non-empty topic name without {' '.join(bad)}: {value!r}")


class MqttConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="mqtt",
                 tag_field="type"):
    """MQTT (aiomqtt) uplink and ingest settings.

    Device side publishes to ``<prefix>/up/<device_id>`` (QoS 1) and receives acks on
    ``<prefix>/ack/<device_id>``; the ingest subscribes ``$share/<share_group>/<prefix>/up/+``.
    """

    host: str = "127.0.0.1"
    port: int = 1883
    prefix: str = "pymigrate"
    protocol: str = "5"  # "5" (response topic + correlation data) or "3.1.1"
    client_id: str = ""  # default: the device id (persistent session per device)
    clean_start: bool = False  # False keeps the session (and queued acks) across reconnects
    session_expiry_s: int = 86_400  # MQTT 5: how long the broker keeps an absent session
    keepalive_s: int = 30
    connect_timeout_s: float = 10.0
    end_to_end: bool = True  # False: PUBACK is the ack (weaker)
    max_payload: int = _MAX_PAYLOAD
    username: str = ""
    password: str = ""
    tls: bool = False  # implied by ca_file / cert_file
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    tls_verify_hostname: bool = True
    share_group: str = "pymigrate-ingest"  # ingest side
    max_inflight: int = 16  # ingest side: batches handled at once (per device in order)

    def __post_init__(self) -> None:
        _check_port("mqtt", self.port)
        if self.protocol not in ("5", "3.1.1"):
            raise ConfigError("uplink.mqtt.protocol",
                              f"must be '5' or '3.1.1', got {self.protocol!r}")
        _check_segment("mqtt", "prefix", self.prefix, slash_ok=True)
        _check_segment("mqtt", "share_group", self.share_group, slash_ok=False)
        _check_positive("mqtt", "keepalive_s", self.keepalive_s)
        if not 0 <= self.session_expiry_s <= 0xFFFFFFFF:
            raise ConfigError("uplink.mqtt.session_expiry_s", "must be in 0..4294967295")
        _check_positive("mqtt", "connect_timeout_s", self.connect_timeout_s)
        _check_positive("mqtt", "max_payload", self.max_payload)
        _check_positive("mqtt", "max_inflight", self.max_inflight)
        _check_tls("mqtt", self.cert_file, self.key_file)
        if self.password and not self.username:
            raise ConfigError("uplink.mqtt.password", "set username too")

    @property
    def use_tls(self) -> bool:
        return self.tls or bool(self.ca_file or self.cert_file)


class CoapConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="coap",
                 tag_field="type"):
    """CoAP (aiocoap) uplink and ingest settings: ``coap://host:port/<path>/<device_id>``."""

    host: str = "127.0.0.1"
    port: int = 5683
    path: str = "ingest"
    max_payload: int = _MAX_PAYLOAD  # aiocoap sends larger bodies block-wise (Block1)
    ack_timeout_s: float = 2.0  # RFC 7252 ACK_TIMEOUT: first retransmission of a CON

    def __post_init__(self) -> None:
        _check_port("coap", self.port)
        _check_positive("coap", "ack_timeout_s", self.ack_timeout_s)
        if not self.path or "/" in self.path.strip("/"):
            raise ConfigError("uplink.coap.path", f"must be one path segment, got {self.path!r}")
        _check_positive("coap", "max_payload", self.max_payload)

    @property
    def uri(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"coap://{host}:{self.port}/{self.path.strip('/')}"


def parse_endpoint(key: str, item: str, default_port: int) -> tuple[str, int]:
    """``"host"``, ``"host:port"`` or ``"[v6]:port"`` -> (host, port); ConfigError naming
    ``key`` otherwise."""
    text = item.strip()
    host, port = text, default_port
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(key, f"unclosed [ in {item!r}")
        host, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(key, f"expected host:port, got {item!r}")
            port = _port_of(key, rest[1:], item)
    elif text.count(":") == 1:
        host, p = text.split(":")
        port = _port_of(key, p, item)
    if not host or any(c.isspace() for c in host) or "/" in host:
        raise ConfigError(key, f"expected host or host:port, got {item!r}")
    if not 0 < port < 65536:
        raise ConfigError(key, f"port must be in 1..65535, got {item!r}")
    return host, port


def _port_of(key: str, text: str, item: str) -> int:
    if not text.isdigit():
        raise ConfigError(key, f"port must be a number, got {item!r}")
    return int(text)


class AmqpConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="amqp",
                 tag_field="type"):
    """AMQP 0-9-1 (aio-pika) uplink and ingest settings.

    Devices publish persistent messages to the durable topic ``exchange`` with routing key
    ``<routing_prefix>.<device_id>``; the ingest consumes the durable ``queue``.

    A RabbitMQ cluster: list its nodes in ``hosts`` (``"host:port"``; ``host``/``port``
    are then unused). A client connects to one node and moves to the next one in the list
    when its connection is lost or refused. ``queue_type`` (ingest side): ``"auto"``
    (default) uses the queue as it is when it exists and creates a quorum queue when it
    does not; ``"quorum"`` declares a replicated quorum queue (a majority of the nodes
    holds each message before the publisher confirm) and refuses a queue of another type;
    ``"classic"`` a classic one. RabbitMQ cannot redeclare a queue as another type, so
    ``auto`` keeps a classic queue made by an earlier version working on a single node.
    """

    host: str = "127.0.0.1"
    port: int = 5672
    hosts: list[str] = msgspec.field(default_factory=list)  # cluster nodes, "host:port"
    virtualhost: str = "/"
    username: str = "guest"
    password: str = "guest"
    exchange: str = "pymigrate"
    queue: str = "pymigrate.ingest"
    routing_prefix: str = "up"
    end_to_end: bool = True  # False: the publisher confirm is the ack (weaker)
    connect_timeout_s: float = 10.0
    max_payload: int = _MAX_PAYLOAD
    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    tls_verify_hostname: bool = True
    prefetch: int = 32  # ingest side: unacked deliveries per consumer
    max_queue_length: int = 0  # ingest side: >0 makes a full queue nack publishes (throttle)
    identity: str = "routing_key"  # ingest side: "routing_key" or "user_id"
    throttle_retry_after_s: float = 5.0  # device side: wait after a broker nack
    queue_type: str = "auto"  # ingest side: auto (existing as is, new: quorum) | quorum | classic
    reconnect_max_s: float = 5.0  # ingest side: longest wait between reconnect attempts

    def __post_init__(self) -> None:
        _check_port("amqp", self.port)
        for i, item in enumerate(self.hosts):
            parse_endpoint(f"uplink.amqp.hosts[{i}]", item, self.port)
        if len(set(self.endpoints())) != len(self.endpoints()):
            raise ConfigError("uplink.amqp.hosts", f"names a node twice: {self.hosts}")
        if self.queue_type not in ("auto", "quorum", "classic"):
            raise ConfigError("uplink.amqp.queue_type",
                              f"must be 'auto', 'quorum' or 'classic', got {self.queue_type!r}")
        _check_positive("amqp", "reconnect_max_s", self.reconnect_max_s)
        for key in ("exchange", "queue", "routing_prefix"):
            if not getattr(self, key):
                raise ConfigError(f"uplink.amqp.{key}", "must not be empty")
        if any(c in self.routing_prefix for c in "*#"):
            raise ConfigError("uplink.amqp.routing_prefix", "must not contain wildcards")
        _check_positive("amqp", "connect_timeout_s", self.connect_timeout_s)
        _check_positive("amqp", "max_payload", self.max_payload)
        _check_positive("amqp", "prefetch", self.prefetch)
        _check_positive("amqp", "throttle_retry_after_s", self.throttle_retry_after_s)
        if self.max_queue_length < 0:
            raise ConfigError("uplink.amqp.max_queue_length", "must be >= 0")
        if self.identity not in ("routing_key", "user_id"):
            raise ConfigError("uplink.amqp.identity",
                              f"must be 'routing_key' or 'user_id', got {self.identity!r}")
        _check_tls("amqp", self.cert_file, self.key_file)

    @property
    def use_tls(self) -> bool:
        return self.tls or bool(self.ca_file or self.cert_file)

    def endpoints(self) -> list[tuple[str, int]]:
        """The broker nodes in order: ``hosts`` parsed, else ``[(host, port)]``."""
        if not self.hosts:
            return [(self.host, self.port)]
        return [parse_endpoint("uplink.amqp.hosts", h, self.port) for h in self.hosts]


TransportConfig = MqttConfig | CoapConfig | AmqpConfig
_BY_NAME: dict[str, type[MqttConfig] | type[CoapConfig] | type[AmqpConfig]] = {
    "mqtt": MqttConfig, "coap": CoapConfig, "amqp": AmqpConfig}


def parse_transport(name: str, data: dict[str, Any], *, section: str = "uplink") -> TransportConfig:
    """Validate ``data`` (one TOML table) as the config of transport ``name``."""
    cls = _BY_NAME.get(name)
    if cls is None:
        raise ConfigError(f"{section}.type",
                          f"unknown transport {name!r} (expected one of {', '.join(_BY_NAME)})")
    body = {k: v for k, v in data.items() if k != "type"}
    try:
        return convert(body, cls, section=f"{section}.{name}")
    except ConfigError as exc:
        key = str(exc.key)
        if section != "uplink" and key.startswith("uplink."):
            # value checks name "uplink.<type>.<key>"; say where this table really is
            raise ConfigError(f"{section}{key[len('uplink'):]}", str(exc.problem)) from None
        raise


def parse_transports(items: list[dict[str, Any]], *,
                     section: str = "uplink.transports") -> list[TransportConfig]:
    """Validate an ordered failover list; each item names its ``type``."""
    out: list[TransportConfig] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "type" not in item:
            raise ConfigError(f"{section}[{i}].type", "each transport needs a type")
        out.append(parse_transport(str(item["type"]), item, section="uplink"))
    return out
