"""The wire envelope: ``magic | version | body length | body | crc32``.

The body is a msgpack ``Batch`` (device id, batch id, send time, chunk list). Every
decode failure is a typed :class:`DecodeError` with a reason code; nothing is allocated
past ``max_bytes``.
"""

from __future__ import annotations

import struct
import zlib

import msgspec

from pymigrate.errors import DecodeError
from pymigrate.types import Ack, Chunk

MAGIC = b"PMIG"
VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})
HEADER = struct.Struct("<4sBI")  # magic, version, body length
TRAILER = struct.Struct("<I")  # crc32 over header + body
DEFAULT_MAX_BYTES = 16 * 1024 * 1024


class Batch(msgspec.Struct, frozen=True):
    """What one upload carries: chunks of one device."""

    device_id: str
    batch_id: str
    chunks: list[Chunk]
    sent_ms: int = 0

    @property
    def count(self) -> int:
        return sum(c.count for c in self.chunks)


_benc = msgspec.msgpack.Encoder()
_bdec = msgspec.msgpack.Decoder(Batch)
_aenc = msgspec.json.Encoder()
_adec = msgspec.json.Decoder(Ack)


def encode_batch(batch: Batch) -> bytes:
    body = _benc.encode(batch)
    head = HEADER.pack(MAGIC, VERSION, len(body))
    return head + body + TRAILER.pack(zlib.crc32(body, zlib.crc32(head)))


def decode_batch(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Batch:
    """Decode and verify an envelope. Raises DecodeError (reason in ``.reason``)."""
    if len(data) > max_bytes:
        raise DecodeError(f"envelope of {len(data)} bytes exceeds {max_bytes}", reason="oversized")
    if len(data) < HEADER.size + TRAILER.size:
        raise DecodeError("envelope truncated", reason="truncated")
    magic, version, body_len = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise DecodeError("not a PyMigrate envelope (bad magic)", reason="bad_magic")
    if version not in SUPPORTED_VERSIONS:
        raise DecodeError(f"unsupported envelope version {version}", reason="bad_version")
    if HEADER.size + body_len + TRAILER.size != len(data):
        raise DecodeError("envelope length mismatch (truncated or padded)", reason="truncated")
    body = data[HEADER.size: HEADER.size + body_len]
    (crc,) = TRAILER.unpack_from(data, HEADER.size + body_len)
    if zlib.crc32(body, zlib.crc32(data[: HEADER.size])) != crc:
        raise DecodeError("envelope checksum mismatch", reason="checksum")
    try:
        batch = _bdec.decode(body)
    except msgspec.DecodeError as exc:
        raise DecodeError(f"malformed envelope body: {exc}", reason="malformed") from exc
    for c in batch.chunks:
        if c.device_id != batch.device_id:
            raise DecodeError("chunk device differs from batch device", reason="device_mismatch")
    return batch


def encode_ack(ack: Ack) -> bytes:
    return _aenc.encode(ack)


def decode_ack(data: bytes) -> Ack:
    try:
        return _adec.decode(data)
    except msgspec.DecodeError as exc:
        raise DecodeError(f"malformed ack: {exc}", reason="malformed") from exc
