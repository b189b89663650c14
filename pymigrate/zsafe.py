"""Bounded zstd decompression: never allocate more than the caller allows.

``ZstdDecompressor.decompress`` trusts a frame header's declared content size and
allocates it before looking at the data (``max_output_size`` only applies to frames that
declare none), so 16 hostile bytes can demand a terabyte. Check the header first.
"""

from __future__ import annotations

import zstandard

from pymigrate.errors import DecodeError

_DCTX = zstandard.ZstdDecompressor()


def zstd_decompress(data: bytes, limit: int, *,
                    dctx: zstandard.ZstdDecompressor | None = None) -> bytes:
    """Decompress one zstd frame of at most ``limit`` bytes; DecodeError otherwise."""
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise DecodeError(f"malformed zstd frame: {exc}", reason="malformed") from exc
    if declared > limit:
        raise DecodeError(f"zstd frame declares {declared} bytes, over {limit}",
                          reason="oversized")
    try:
        out = (dctx or _DCTX).decompress(data, max_output_size=limit)
    except zstandard.ZstdError as exc:
        raise DecodeError(f"malformed zstd frame: {exc}", reason="malformed") from exc
    if len(out) > limit:  # pragma: no cover - zstandard enforces max_output_size
        raise DecodeError("zstd frame inflates past the limit", reason="oversized")
    return bytes(out)
