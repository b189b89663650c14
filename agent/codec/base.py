"""Codec registry and the chunk seal/open functions every codec shares."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Protocol

from pymigrate.errors import CorruptChunk, DecodeError
from pymigrate.types import Chunk, Priority, Reading


class ChunkCodec(Protocol):
    """Encodes the readings of one device and priority into bytes, and back."""

    codec_id: int
    name: str

    def encode(self, readings: Sequence[Reading]) -> bytes: ...

    def decode(self, payload: bytes, device_id: str, priority: Priority) -> list[Reading]: ...


CODECS: dict[str, ChunkCodec] = {}
_BY_ID: dict[int, ChunkCodec] = {}
DEFAULT_CODEC = "tsz-lz4"


def register(codec: ChunkCodec) -> ChunkCodec:
    CODECS[codec.name] = codec
    _BY_ID[codec.codec_id] = codec
    return codec


def codec_by_name(name: str) -> ChunkCodec:
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r} (known: {', '.join(sorted(CODECS))})") from None


def codec_by_id(codec_id: int) -> ChunkCodec:
    try:
        return _BY_ID[codec_id]
    except KeyError:
        raise DecodeError(f"unknown codec id {codec_id}", reason="unknown_codec") from None


def seal_chunk(readings: Sequence[Reading], codec: str | ChunkCodec = DEFAULT_CODEC) -> Chunk:
    """Seal readings (one device, one priority, seqs already assigned) into a Chunk."""
    if not readings:
        raise ValueError("cannot seal an empty chunk")
    c = codec_by_name(codec) if isinstance(codec, str) else codec
    first = readings[0]
    with_ranges = getattr(c, "encode_with_ranges", None)
    if with_ranges is not None:
        # the codec already holds the columns: it returns the ranges with the payload
        payload, (seq_first, seq_last, ts_first, ts_last) = with_ranges(readings)
    else:
        payload = c.encode(readings)
        seqs = [r.seq for r in readings]
        tss = [r.ts_ms for r in readings]
        seq_first, seq_last, ts_first, ts_last = min(seqs), max(seqs), min(tss), max(tss)
    return Chunk(
        device_id=first.device_id,
        priority=first.priority,
        seq_first=seq_first,
        seq_last=seq_last,
        count=len(readings),
        ts_first=ts_first,
        ts_last=ts_last,
        codec=c.codec_id,
        payload=payload,
        checksum=zlib.crc32(payload),
    )


def open_chunk(chunk: Chunk) -> list[Reading]:
    """Verify a chunk's checksum and decode it; raises CorruptChunk or DecodeError."""
    if zlib.crc32(chunk.payload) != chunk.checksum:
        raise CorruptChunk("chunk checksum mismatch", device=chunk.device_id,
                           seq_first=chunk.seq_first)
    codec = codec_by_id(chunk.codec)
    expecting = getattr(codec, "decode_expecting", None)
    if expecting is not None:
        # the codec refuses a payload whose point count differs before allocating it
        readings: list[Reading] = expecting(chunk.payload, chunk.device_id, chunk.priority,
                                            chunk.count)
    else:
        readings = codec.decode(chunk.payload, chunk.device_id, chunk.priority)
    if len(readings) != chunk.count:
        raise CorruptChunk(f"chunk count mismatch: header {chunk.count}, payload {len(readings)}")
    return readings


# register built-in codecs (import for side effect)
from agent.codec import simple as _simple  # noqa: E402,F401
from agent.codec import tsz as _tsz  # noqa: E402,F401
