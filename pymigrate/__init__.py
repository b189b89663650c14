"""PyMigrate IoT: shared core types, clock, errors and the wire envelope."""

from pymigrate.clock import Clock, VirtualClock, WallClock
from pymigrate.envelope import Batch, decode_ack, decode_batch, encode_ack, encode_batch
from pymigrate.errors import (
    BufferFull,
    ConfigError,
    CorruptChunk,
    DecodeError,
    InvalidReading,
    PayloadRejected,
    PyMigrateError,
    ThrottledError,
    TransportError,
)
from pymigrate.types import Ack, AggInfo, Chunk, Priority, Quality, Reading

__version__ = "0.1.0"

__all__ = [
    "Ack", "AggInfo", "Batch", "BufferFull", "Chunk", "Clock", "ConfigError", "CorruptChunk",
    "DecodeError", "InvalidReading", "PayloadRejected", "Priority", "PyMigrateError",
    "Quality", "Reading", "ThrottledError", "TransportError", "VirtualClock", "WallClock",
    "decode_ack", "decode_batch", "encode_ack", "encode_batch",
]
