"""Transport adapters (MQTT, CoAP, AMQP) behind one interface; see :mod:`transports.base`."""

from transports.base import Incoming, IngestHandler, IngestServer, Uplink

__all__ = ["Incoming", "IngestHandler", "IngestServer", "Uplink"]
