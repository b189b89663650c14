"""The in-memory buffer fake used by uploader tests (same API as ``agent.buffer``)."""

from __future__ import annotations

from simulators.membuffer import MemoryBuffer as FakeBuffer
from simulators.membuffer import StoredChunk

__all__ = ["FakeBuffer", "StoredChunk"]
