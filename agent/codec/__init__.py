"""Chunk codecs: one format for disk and wire (no re-encoding on upload).

Public surface: :func:`seal_chunk` turns readings into a checksummed :class:`Chunk`,
:func:`open_chunk` verifies and decodes one. Codecs are picked by name from a registry.
"""

from __future__ import annotations

from agent.codec.base import (
    CODECS,
    DEFAULT_CODEC,
    ChunkCodec,
    codec_by_id,
    codec_by_name,
    open_chunk,
    register,
    seal_chunk,
)
from agent.codec.tsz import ChunkMeta, TszCodec, chunk_meta

__all__ = [
    "CODECS",
    "DEFAULT_CODEC",
    "ChunkCodec",
    "ChunkMeta",
    "TszCodec",
    "chunk_meta",
    "codec_by_id",
    "codec_by_name",
    "open_chunk",
    "register",
    "seal_chunk",
]
