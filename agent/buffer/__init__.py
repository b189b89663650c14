"""The durable buffer of the edge agent: accepted readings, sealed into compressed chunks,
kept in SQLite (WAL) within a byte budget until the uploader has them acknowledged."""

from __future__ import annotations

from agent.buffer.config import BufferConfig, Retention
from agent.buffer.durable import DurableBuffer
from agent.buffer.types import BufferStats, StoredChunk

__all__ = ["BufferConfig", "BufferStats", "DurableBuffer", "Retention", "StoredChunk"]
