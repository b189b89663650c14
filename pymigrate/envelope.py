"""The wire envelope: ``magic | version | body length | body | crc32``.

Version 4 (written by default) is version 3 plus the stream identity and the completeness
ledger: the agent's ``instance`` id (generated once per buffer, so two agents configured
with one device id are two streams, not one), ``seq_base`` (the first sequence number of
that stream), ``hwm`` (the highest sequence number the agent has issued so far) and the
gap records (:class:`~pymigrate.types.Gap`) it wants the cloud to keep. A batch may carry
gaps and no chunks.
Version 4 may end with ``dead_letter``: a reason (e.g. ``expired``) asking the cloud to
keep the batch's chunks in its dead letters, with gap records of that reason, instead of
storing the readings (``buffer.retention_action = "dead_letter"``). A cloud that predates
the field ignores it and stores the readings.
Version 5 is version 4 with a body that did not shrink when compressed (sent plain).
Version 3 is version 2 with the body zstd-compressed as a whole
(falling back to version 2 when that does not shrink it): chunk payloads are already
compressed, but what repeats from chunk to chunk of a device (series names, which the
tsz codec keeps outside its own entropy stage) is then stored about once per batch.
Version 2 packs the body as positional msgpack arrays: device id,
batch id, send time, then per chunk priority, first sequence, sequence span, count,
first timestamp, time span, codec id, payload and checksum (the chunk's device is the
batch's). That costs ~35 bytes per chunk where version 1 (a msgpack map per chunk, still
decoded) costs ~150. Every decode failure is a typed :class:`DecodeError` with a reason
code; nothing is allocated past ``max_bytes``, and chunk headers are checked for
consistency (count >= 1, spans >= 0, int64 ranges, 32-bit checksum, codec id < 256).
"""

from __future__ import annotations

import struct
import zlib

import msgspec
import zstandard

from pymigrate.errors import DecodeError
from pymigrate.types import Ack, Chunk, Gap, Priority

MAGIC = b"PMIG"
VERSION = 4
SUPPORTED_VERSIONS = frozenset({1, 2, 3, 4, 5})  # 5: the body of 4, not compressed
MAX_GAPS = 4096
MAX_GAP_RUNS = 100_000
MAX_CHUNK_POINTS = 1_000_000
DEFAULT_MAX_POINTS = 4_000_000
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1
HEADER = struct.Struct("<4sBI")  # magic, version, body length
TRAILER = struct.Struct("<I")  # crc32 over header + body
DEFAULT_MAX_BYTES = 16 * 1024 * 1024


class Batch(msgspec.Struct, frozen=True):
    """What one upload carries: chunks of one device."""

    device_id: str
    batch_id: str
    chunks: list[Chunk]
    sent_ms: int = 0
    instance: str = ""
    seq_base: int = 1
    hwm: int = 0
    gaps: list[Gap] = msgspec.field(default_factory=list)
    dead_letter: str = ""  # non-empty: keep the chunks as dead letters of this reason

    @property
    def count(self) -> int:
        return sum(c.count for c in self.chunks)


class _ChunkV2(msgspec.Struct, array_like=True, frozen=True):
    priority: Priority
    seq_first: int
    seq_span: int
    count: int
    ts_first: int
    ts_span: int
    codec: int
    payload: bytes
    checksum: int


class _BatchV2(msgspec.Struct, array_like=True, frozen=True):
    device_id: str
    batch_id: str
    sent_ms: int
    chunks: list[_ChunkV2]
    # version 4 (absent in 2 and 3)
    instance: str = ""
    seq_base: int = 1
    hwm: int = 0
    gaps: list[Gap] = msgspec.field(default_factory=list)
    dead_letter: str = ""


_benc = msgspec.msgpack.Encoder()
_bdec = msgspec.msgpack.Decoder(Batch)
_bdec2 = msgspec.msgpack.Decoder(_BatchV2)


def _to_v2(batch: Batch, version: int) -> _BatchV2:
    chunks = [_ChunkV2(c.priority, c.seq_first, c.seq_last - c.seq_first, c.count, c.ts_first,
                       c.ts_last - c.ts_first, c.codec, c.payload, c.checksum)
              for c in batch.chunks]
    if version < 4:
        return _BatchV2(batch.device_id, batch.batch_id, batch.sent_ms, chunks)
    return _BatchV2(batch.device_id, batch.batch_id, batch.sent_ms, chunks, batch.instance,
                    batch.seq_base, batch.hwm, batch.gaps, batch.dead_letter)


def _from_v2(b: _BatchV2) -> Batch:
    return Batch(b.device_id, b.batch_id, [
        Chunk(b.device_id, c.priority, c.seq_first, c.seq_first + c.seq_span, c.count,
              c.ts_first, c.ts_first + c.ts_span, c.codec, c.payload, c.checksum)
        for c in b.chunks], b.sent_ms, b.instance, b.seq_base, b.hwm, b.gaps, b.dead_letter)


def _check_gap(g: Gap) -> None:
    if not (1 <= g.seq_first <= g.seq_last <= _I64_MAX) or g.count < 0:
        raise DecodeError("gap range is reversed or out of range", reason="malformed")
    if not g.reason or len(g.reason) > 64 or len(g.detail) > 1024:
        raise DecodeError("gap reason missing or too long", reason="malformed")
    if len(g.runs) > MAX_GAP_RUNS:
        raise DecodeError(f"gap has {len(g.runs)} runs, over {MAX_GAP_RUNS}",
                          reason="oversized")
    prev = g.seq_first - 1
    n = 0
    for a, b in g.runs:
        if a <= prev or b < a or b > g.seq_last:
            raise DecodeError("gap runs unsorted, overlapping or outside the gap",
                              reason="malformed")
        n += b - a + 1
        prev = b
    if g.runs and (g.runs[0][0] != g.seq_first or n != g.count):
        raise DecodeError("gap runs disagree with its range or count", reason="malformed")


_zc = zstandard.ZstdCompressor(level=3, write_checksum=False)
_zd = zstandard.ZstdDecompressor()


def _inflate(body: bytes, limit: int) -> bytes:
    """Decompress a v3 body; the declared size is checked before anything is allocated."""
    try:
        size = zstandard.frame_content_size(body)
    except zstandard.ZstdError as exc:
        raise DecodeError(f"malformed compressed body: {exc}", reason="malformed") from exc
    if size < 0:
        raise DecodeError("compressed body does not declare its size", reason="malformed")
    if size > limit:
        raise DecodeError(f"body inflates to {size} bytes, over {limit}", reason="oversized")
    try:
        return _zd.decompress(body, max_output_size=limit)
    except zstandard.ZstdError as exc:
        raise DecodeError(f"malformed compressed body: {exc}", reason="malformed") from exc


def _check_chunk(c: Chunk) -> None:
    for name in ("seq_first", "seq_last", "ts_first", "ts_last"):
        if not _I64_MIN <= getattr(c, name) <= _I64_MAX:
            raise DecodeError(f"chunk {name} outside int64", reason="malformed")
    if c.seq_last < c.seq_first or c.ts_last < c.ts_first:
        raise DecodeError("chunk range is reversed", reason="malformed")
    if not 1 <= c.count <= MAX_CHUNK_POINTS:
        raise DecodeError(f"chunk count {c.count} out of range", reason="malformed")
    if not 0 <= c.codec <= 255 or not 0 <= c.checksum <= 0xFFFFFFFF:
        raise DecodeError("chunk codec id or checksum out of range", reason="malformed")
_aenc = msgspec.json.Encoder()
_adec = msgspec.json.Decoder(Ack)


def encode_batch(batch: Batch, *, version: int = VERSION) -> bytes:
    """Encode a batch into a checksummed envelope (``version`` 4 by default; 1-3 for old peers)."""
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"cannot write envelope version {version}")
    if version < 4 and (batch.gaps or batch.instance or batch.dead_letter):
        raise ValueError(f"envelope version {version} cannot carry gaps, an instance id or "
                         "a dead-letter request")
    body = _benc.encode(batch if version == 1 else _to_v2(batch, version))
    if version in (3, 4):
        packed = _zc.compress(body)
        if len(packed) < len(body):
            body = packed
        elif version == 3:
            version = 2  # nothing to gain: send the plain body
        else:
            version = 5  # version 4 content, body not compressed
    head = HEADER.pack(MAGIC, version, len(body))
    return head + body + TRAILER.pack(zlib.crc32(body, zlib.crc32(head)))


def decode_batch(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_points: int = DEFAULT_MAX_POINTS) -> Batch:
    """Decode and verify an envelope. Raises DecodeError (reason in ``.reason``).

    ``max_points`` caps the readings all chunks together declare, so a small hostile
    batch cannot make the caller decode (allocate) millions of readings.
    """
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
    if version in (3, 4):
        body = _inflate(body, max_bytes)
    try:
        batch = _bdec.decode(body) if version == 1 else _from_v2(_bdec2.decode(body))
    except (msgspec.DecodeError, ValueError) as exc:  # ValueError: msgspec's bad utf-8
        raise DecodeError(f"malformed envelope body: {exc}", reason="malformed") from exc
    for c in batch.chunks:
        if c.device_id != batch.device_id:
            raise DecodeError("chunk device differs from batch device", reason="device_mismatch")
        _check_chunk(c)
    if len(batch.gaps) > MAX_GAPS:
        raise DecodeError(f"batch carries {len(batch.gaps)} gaps, over {MAX_GAPS}",
                          reason="oversized")
    for g in batch.gaps:
        _check_gap(g)
    if len(batch.dead_letter) > 64:
        raise DecodeError("dead-letter reason too long", reason="malformed")
    if len(batch.instance) > 64 or batch.seq_base < 1 or not 0 <= batch.hwm <= _I64_MAX:
        raise DecodeError("bad stream identity (instance, seq_base, hwm)", reason="malformed")
    if batch.count > max_points:
        raise DecodeError(f"batch declares {batch.count} readings, over {max_points}",
                          reason="oversized")
    return batch


def encode_ack(ack: Ack) -> bytes:
    return _aenc.encode(ack)


def decode_ack(data: bytes) -> Ack:
    try:
        return _adec.decode(data)
    except (msgspec.DecodeError, ValueError) as exc:
        raise DecodeError(f"malformed ack: {exc}", reason="malformed") from exc
