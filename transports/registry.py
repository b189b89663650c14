"""Phase two of transport config: build uplinks and ingest servers from typed configs.

``build_uplinks(configs, device_id)`` gives the uploader its ordered failover list (e.g.
MQTT, then CoAP), all drawing from the same buffer. Configs are the frozen structs of
:mod:`transports.config` (or already-parsed dicts with a ``type``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pymigrate.clock import Clock
from pymigrate.errors import ConfigError
from transports.base import IngestServer, Uplink
from transports.config import AmqpConfig, CoapConfig, MqttConfig, TransportConfig, parse_transport

__all__ = ["NAMES", "build_ingest_server", "build_uplink", "build_uplinks"]

NAMES = ("mqtt", "coap", "amqp")


def _typed(cfg: TransportConfig | dict[str, Any]) -> TransportConfig:
    if isinstance(cfg, dict):
        return parse_transport(str(cfg.get("type", "")), cfg)
    return cfg


def build_uplink(cfg: TransportConfig | dict[str, Any], device_id: str, *,
                 clock: Clock | None = None) -> Uplink:
    """The device-side uplink for one transport config (nothing is connected yet)."""
    cfg = _typed(cfg)
    if not device_id:
        raise ConfigError("device_id", "must not be empty")
    if isinstance(cfg, MqttConfig):
        from transports.mqtt import MqttUplink
        return MqttUplink(cfg, device_id=device_id, clock=clock)
    if isinstance(cfg, CoapConfig):
        from transports.coap import CoapUplink
        return CoapUplink(cfg.uri, device_id=device_id, max_payload=cfg.max_payload,
                          ack_timeout_s=cfg.ack_timeout_s)
    if isinstance(cfg, AmqpConfig):
        from transports.amqp import AmqpUplink
        return AmqpUplink(cfg, device_id=device_id, clock=clock)
    raise ConfigError("uplink.type", f"unknown transport config {type(cfg).__name__}")


def build_uplinks(configs: Sequence[TransportConfig | dict[str, Any]], device_id: str, *,
                  clock: Clock | None = None) -> list[Uplink]:
    """An ordered failover list of uplinks (first = preferred)."""
    if not configs:
        raise ConfigError("uplink.transports", "configure at least one transport")
    return [build_uplink(c, device_id, clock=clock) for c in configs]


def build_ingest_server(cfg: TransportConfig | dict[str, Any], *,
                        clock: Clock | None = None) -> IngestServer:
    """The cloud-side endpoint for one transport config (not started yet)."""
    cfg = _typed(cfg)
    if isinstance(cfg, MqttConfig):
        from transports.mqtt import MqttIngestServer
        return MqttIngestServer(cfg, clock=clock)
    if isinstance(cfg, CoapConfig):
        from transports.coap import CoapIngestServer
        return CoapIngestServer(cfg.host, cfg.port, path=cfg.path)
    if isinstance(cfg, AmqpConfig):
        from transports.amqp import AmqpIngestServer
        return AmqpIngestServer(cfg, clock=clock)
    raise ConfigError("ingest.type", f"unknown transport config {type(cfg).__name__}")
