"""A simple columnar codec: per series, delta-encoded integer columns and raw float64
values, serialized with msgpack and compressed with zstd (id 1) or lz4 (id 2).

It is the portable baseline; specialised codecs register further ids.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from itertools import accumulate, pairwise
from typing import Any

import lz4.frame
import msgspec
import zstandard

from pymigrate.errors import DecodeError
from pymigrate.types import AggInfo, Priority, Reading
from pymigrate.zsafe import zstd_decompress

MAX_DECODED = 64 * 1024 * 1024  # refuse to inflate a payload past this (decompression bombs)

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder()


def _deltas(xs: list[int]) -> list[int]:
    return [xs[0]] + [b - a for a, b in pairwise(xs)] if xs else []


def _columns(readings: Sequence[Reading]) -> list[Any]:
    # the aggregate flag is part of the key: AggInfo("", "", ...) is not "no aggregate"
    groups: dict[tuple[str, bool, str, str], list[Reading]] = {}
    for r in readings:
        key = (r.sensor, True, r.agg.rule, r.agg.fn) if r.agg else (r.sensor, False, "", "")
        groups.setdefault(key, []).append(r)
    out: list[Any] = []
    for (sensor, is_agg, rule, fn), rs in groups.items():
        vals = struct.pack(f"<{len(rs)}d", *[r.value for r in rs])
        col: list[Any] = [
            sensor,
            _deltas([r.ts_ms for r in rs]),
            vals,
            _deltas([r.seq for r in rs]),
            [r.quality for r in rs] if any(r.quality for r in rs) else None,
            [r.uncert_ms for r in rs] if any(r.uncert_ms for r in rs) else None,
            [r.raw_ts_ms for r in rs] if any(r.raw_ts_ms is not None for r in rs) else None,
        ]
        if is_agg:
            col.append([rule, fn, [r.agg.window_end_ms for r in rs if r.agg],
                        [r.agg.count for r in rs if r.agg]])
        out.append(col)
    return out


def _readings(cols: Any, device_id: str, priority: Priority) -> list[Reading]:
    out: list[Reading] = []
    try:
        for col in cols:
            sensor, dts, vals, dseq, qual, unc, raw = col[:7]
            n = len(dts)
            if len(vals) != 8 * n or len(dseq) != n:
                raise DecodeError("column length mismatch", reason="malformed")
            values = struct.unpack(f"<{n}d", vals)
            tss = list(accumulate(dts))
            seqs = list(accumulate(dseq))
            agg = col[7] if len(col) > 7 else None
            for i in range(n):
                out.append(Reading(
                    device_id=device_id, sensor=sensor, ts_ms=tss[i], value=values[i],
                    priority=priority, seq=seqs[i],
                    raw_ts_ms=raw[i] if raw else None,
                    quality=qual[i] if qual else 0,
                    uncert_ms=unc[i] if unc else 0,
                    agg=AggInfo(agg[0], agg[1], agg[2][i], agg[3][i]) if agg else None,
                ))
    except DecodeError:
        raise
    except (TypeError, ValueError, IndexError, struct.error) as exc:
        raise DecodeError(f"malformed chunk payload: {exc}", reason="malformed") from exc
    return out


class MsgpackZstdCodec:
    codec_id = 1
    name = "columnar-zstd"

    def __init__(self, level: int = 3) -> None:
        self._c = zstandard.ZstdCompressor(level=level)
        self._d = zstandard.ZstdDecompressor()

    def encode(self, readings: Sequence[Reading]) -> bytes:
        return self._c.compress(_enc.encode(_columns(readings)))

    def decode(self, payload: bytes, device_id: str, priority: Priority) -> list[Reading]:
        return _guarded(lambda: zstd_decompress(payload, MAX_DECODED, dctx=self._d),
                        device_id, priority)


class MsgpackLz4Codec(MsgpackZstdCodec):
    codec_id = 2
    name = "columnar-lz4"

    def encode(self, readings: Sequence[Reading]) -> bytes:
        return bytes(lz4.frame.compress(_enc.encode(_columns(readings))))

    def decode(self, payload: bytes, device_id: str, priority: Priority) -> list[Reading]:
        def inflate() -> bytes:
            # bounded: a frame that inflates past the limit is refused, not allocated
            d = lz4.frame.LZ4FrameDecompressor()
            raw = d.decompress(payload, max_length=MAX_DECODED + 1)
            if len(raw) > MAX_DECODED:
                raise DecodeError("chunk inflates past the limit", reason="oversized")
            if not d.eof:
                raise DecodeError("lz4 frame truncated", reason="truncated")
            return bytes(raw)

        return _guarded(inflate, device_id, priority)


def _guarded(inflate: Callable[[], bytes], device_id: str,
             priority: Priority) -> list[Reading]:
    """Decode with every library failure on hostile input turned into a DecodeError."""
    try:
        return _readings(_dec.decode(inflate()), device_id, priority)
    except DecodeError:
        raise
    except (zstandard.ZstdError, msgspec.DecodeError, RuntimeError, ValueError, TypeError,
            IndexError, KeyError, AttributeError, OverflowError, struct.error) as exc:
        raise DecodeError(f"cannot decode chunk: {exc}", reason="malformed") from exc


def _register() -> None:
    from agent.codec.base import register

    register(MsgpackZstdCodec())
    register(MsgpackLz4Codec())


_register()
