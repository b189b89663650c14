"""``tsz``: the columnar time-series chunk codec (ids 3 "tsz-zstd" and 4 "tsz-lz4").

Layout of a payload::

    u8 format (1) | u8 flags | [f64 max_abs_err if lossy] | series names |
    uvarint body_len | entropy(body)

The series names (count, then per series kind, sensor[, rule, fn]) stay outside the
entropy stage on purpose: they repeat from chunk to chunk of a device, and the wire
envelope compresses a whole batch, which then stores them about once per batch.

``flags`` bits 0-1 name the entropy stage (0 none, 1 zstd, 2 lz4), bit 2 marks a lossy
chunk; the decoder reads them from the payload, so any tsz id decodes any tsz payload.
The body groups readings by series (sensor + aggregate rule/fn). Series sampled at the
same instants share one timestamp column (delta-of-delta). Values are decimal-scaled to
integers at a resolution detected per series and chunk, with a tiny per-value "ulp"
correction column for float artefacts such as ``927.9630000000001``; values that are not
short decimals (NaN with payload, +-inf, -0.0, huge) go to an exact exception list, and a
series that is mostly such values is XOR-coded with byte planes. The acceptance order
is kept as the series index of each reading (one byte, as the step modulo the series
count: round-robin rows compress to nearly nothing); ``seq`` (usually +1 each), and
``quality``, ``uncert_ms``, ``raw_ts_ms`` and the ``agg`` fields follow as columns in
that order, the optional ones absent (0 bytes, a flag bit) when all-default. Integer
columns pick constant / arithmetic progression / raw / delta / delta-of-delta per
segment, zigzag + LEB128 varints. Every field of every Reading round-trips exactly,
values bit-for-bit, in the original order.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import lz4.block
import numpy as np
import zstandard

from agent.codec._bits import (
    F64,
    I64,
    MAX_POINTS,
    U8,
    Cursor,
    decode_intcol,
    decode_segments,
    encode_intcol,
    encode_segments,
    uvarint,
)
from pymigrate.errors import DecodeError
from pymigrate.types import AggInfo, Priority, Reading
from pymigrate.zsafe import zstd_decompress

FORMAT = 1
MAX_BODY = 64 * 1024 * 1024  # refuse to inflate a body past this (decompression bombs)
ENTROPY = {"none": 0, "zstd": 1, "lz4": 2}
_FLAG_LOSSY = 4
_MAX_DIGITS = 15  # 10**15 * value must stay below 2**52 to be exact
_KMAX = 64  # largest ulp correction kept on the decimal path
_P10 = [10.0**d for d in range(_MAX_DIGITS + 1)]
_NO_DIGITS = 99
_LIMIT52 = float(2**52)
# value modes
_V_DECIMAL, _V_XOR, _V_LOSSY = 0, 1, 2


@dataclass(frozen=True)
class ChunkMeta:
    """What a tsz payload header says: format, entropy stage, lossy bound (None = exact)."""

    format: int
    entropy: str
    max_abs_err: float | None


def chunk_meta(payload: bytes) -> ChunkMeta:
    """Read a tsz payload header without decoding the body."""
    fmt, flags, max_err, _ = _header(payload)
    names = {v: k for k, v in ENTROPY.items()}
    return ChunkMeta(fmt, names[flags & 3], max_err)


def _header(payload: bytes) -> tuple[int, int, float | None, Cursor]:
    cur = Cursor(payload)
    fmt = cur.u8()
    if fmt != FORMAT:
        raise DecodeError(f"unsupported tsz format {fmt}", reason="bad_version")
    flags = cur.u8()
    if flags & ~(3 | _FLAG_LOSSY) or flags & 3 == 3:
        raise DecodeError(f"unknown tsz flags {flags:#x}", reason="malformed")
    max_err = cur.f64() if flags & _FLAG_LOSSY else None
    return fmt, flags, max_err, cur


def _decimal_digits(v: F64) -> U8:
    """Per value, the fewest decimals d with v == m/10**d (+ a few ulps), else 99."""
    out = np.full(v.size, _NO_DIGITS, dtype=np.uint8)
    idx = np.flatnonzero(np.isfinite(v) & ~((v == 0) & np.signbit(v)))
    sub = v[idx]
    with np.errstate(all="ignore"):
        for d, p in enumerate(_P10):
            m = np.rint(sub * p) + 0.0  # +0.0: the decoder has no -0
            k = sub.view(np.int64) - (m / p).view(np.int64)
            ok = (k + _KMAX).view(np.uint64) <= 2 * _KMAX  # magnitude is checked at encode
            if ok.all():
                out[idx] = d
                break
            out[idx[ok]] = d
            keep = ~ok
            idx = idx[keep]
            sub = sub[keep]
    return out


def _choose_digits(dmin: U8, sid: I64, counts: I64) -> I64:
    """Per series, the decimals minimising (exceptions * 9 bytes + digits * 0.42 bytes);
    -1 when most values are not short decimals (the XOR path)."""
    s = counts.size
    hist = np.bincount(sid * 17 + np.minimum(dmin, 16), minlength=17 * s).reshape(s, 17)
    within = np.cumsum(hist[:, :16], axis=1)  # values representable with <= d decimals
    exc = counts[:, None] - within
    cost = 9.0 * exc + 0.42 * np.arange(16)[None, :] * within
    best: I64 = np.argmin(cost, axis=1)
    best[exc[np.arange(s), best] * 2 > counts] = -1
    return best


def _fill_forward(m: F64, good: Any) -> I64:
    """Exceptions take the previous good integer, so they cost nothing in the deltas."""
    pos = np.where(good, np.arange(m.size), -1)
    pos = np.maximum.accumulate(pos)
    filled = np.where(pos >= 0, m[np.maximum(pos, 0)], 0.0)
    return filled.astype(np.int64)


def _str(s: str) -> bytes:
    raw = s.encode("utf-8")
    return uvarint(len(raw)) + raw


def _encode_pattern(sid0: I64, s_count: int) -> bytes:
    """Series id of each reading in acceptance order. With <= 256 series: the step from
    the previous id modulo the series count, one byte each (round-robin rows become a run
    of ones the entropy stage all but erases)."""
    if s_count == 1:
        return b""
    if s_count <= 256:
        step = np.diff(sid0, prepend=0) % s_count
        return step.astype(np.uint8).tobytes()
    return encode_intcol(sid0)


def _decode_pattern(cur: Cursor, n: int, counts: I64) -> I64:
    s_count = counts.size
    if s_count == 1:
        return np.zeros(n, dtype=np.int64)
    if s_count <= 256:
        step = np.frombuffer(cur.take(n), dtype=np.uint8).astype(np.int64)
        sid0: I64 = np.cumsum(step) % s_count
    else:
        sid0 = decode_intcol(cur, n)
        if int(sid0.min()) < 0 or int(sid0.max()) >= s_count:
            raise DecodeError("series index out of range", reason="malformed")
    if not np.array_equal(np.bincount(sid0, minlength=s_count), counts):
        raise DecodeError("series pattern disagrees with series sizes", reason="malformed")
    return sid0


class TszCodec:
    """Columnar time-series codec; ``entropy`` is "zstd" or "lz4" (light, for weak CPUs).

    ``lossy_resolution`` (optional, explicit) quantizes finite values to multiples of it
    with a guaranteed max absolute error of half of it, recorded in the payload header
    (:func:`chunk_meta`, the largest over the chunk) and per series; non-finite values and
    -0.0 stay exact. A mapping ``{sensor: resolution}`` quantizes only those sensors (the
    declared resolution of each), everything else stays exact.
    """

    def __init__(self, codec_id: int = 3, name: str = "tsz-zstd", *, entropy: str = "zstd",
                 level: int = 3,
                 lossy_resolution: float | Mapping[str, float] | None = None) -> None:
        if entropy not in ENTROPY:
            raise ValueError(f"unknown entropy stage {entropy!r}")
        if lossy_resolution is not None:
            values = (lossy_resolution.values() if isinstance(lossy_resolution, Mapping)
                      else [lossy_resolution])
            if not all(0 < r < float("inf") for r in values):
                raise ValueError("lossy_resolution must be a positive finite number")
        self.codec_id = codec_id
        self.name = name
        self.entropy = entropy
        self.lossy_resolution = lossy_resolution
        self._zc = zstandard.ZstdCompressor(
            level=level, write_content_size=False, write_checksum=False, write_dict_id=False)
        self._zd = zstandard.ZstdDecompressor()

    # ---------------------------------------------------------------- encode
    def encode(self, readings: Sequence[Reading]) -> bytes:
        """Encode readings (any order, any series mix) into one payload."""
        return self.encode_with_ranges(readings)[0]

    def encode_with_ranges(self, readings: Sequence[Reading]
                           ) -> tuple[bytes, tuple[int, int, int, int]]:
        """Encode, and return (min seq, max seq, min ts, max ts) for the chunk header."""
        n = len(readings)
        if n == 0 or n > MAX_POINTS:
            raise ValueError(f"a chunk holds 1..{MAX_POINTS} readings, got {n}")
        # one comprehension per field is ~2x faster than transposing attrgetter tuples
        sensors = [r.sensor for r in readings]
        tss = [r.ts_ms for r in readings]
        vals = [r.value for r in readings]
        seqs = [r.seq for r in readings]
        quals = [r.quality for r in readings]
        uncs = [r.uncert_ms for r in readings]
        raws = [r.raw_ts_ms for r in readings]
        aggs = [r.agg for r in readings]
        has_agg = aggs.count(None) != n
        keys: Sequence[Any] = (
            [s if a is None else (s, a.rule, a.fn) for s, a in zip(sensors, aggs)]
            if has_agg else sensors)
        keymap = {k: i for i, k in enumerate(dict.fromkeys(keys))}
        sid_list = list(map(keymap.__getitem__, keys))
        gflags = 0
        try:
            sid0 = np.array(sid_list, dtype=np.int64)
            order = np.argsort(sid0, kind="stable")
            sid = sid0[order]
            ts = np.array(tss, dtype=np.int64)[order]
            v = np.array(vals, dtype=np.float64)[order]
            seq = np.array(seqs, dtype=np.int64)
            opt: list[I64 | None] = [None] * 6
            if any(quals):
                opt[0] = np.array(quals, dtype=np.int64)
            if any(uncs):
                opt[1] = np.array(uncs, dtype=np.int64)
            n_raw_none = raws.count(None)
            if n_raw_none != n:
                opt[2] = np.array([0 if r is None else r for r in raws], np.int64)
                if n_raw_none:
                    opt[3] = np.array([r is None for r in raws], dtype=np.int64)
            if has_agg:
                opt[4] = np.array([a.window_end_ms if a else 0 for a in aggs], np.int64)
                opt[5] = np.array([a.count if a else 0 for a in aggs], np.int64)
        except OverflowError as exc:
            raise ValueError(f"reading field outside int64: {exc}") from exc
        for i, col in enumerate(opt):
            if col is not None:
                gflags |= _G_QUAL << i
        counts = np.bincount(sid)
        s_count = counts.size
        ends = np.cumsum(counts)
        starts = (ends - counts).tolist()
        ends_l = ends.tolist()
        res = self._resolutions(keymap)
        if all(r > 0 for r in res):
            modes = [_V_LOSSY] * s_count
            digits = [0] * s_count
        else:
            digits = _choose_digits(_decimal_digits(v), sid, counts).tolist()
            modes = [_V_LOSSY if r > 0 else _V_XOR if d < 0 else _V_DECIMAL
                     for r, d in zip(res, digits)]

        # series table and shared timestamp groups
        groups: dict[bytes, int] = {}
        g_cols: list[I64] = []
        table: list[bytes] = []
        names: list[bytes] = []
        for i, key in enumerate(keymap):
            t = ts[starts[i]:ends_l[i]]
            tkey = t.tobytes()
            g = groups.get(tkey)
            if g is None:
                g = groups[tkey] = len(groups)
                g_cols.append(t)
            if isinstance(key, tuple):
                names.append(b"".join((b"\x01", _str(key[0]), _str(key[1]), _str(key[2]))))
            else:
                names.append(b"\x00" + _str(key))
            table.append(uvarint(g) + bytes((modes[i], max(digits[i], 0)))
                         + (struct.pack("<d", res[i]) if modes[i] == _V_LOSSY else b""))
        g_counts = np.array([c.size for c in g_cols], dtype=np.int64)
        parts = [*table, uvarint(len(g_cols)), *(uvarint(c) for c in g_counts.tolist()),
                 encode_segments(np.concatenate(g_cols), g_counts)]

        # values
        mode_el = np.repeat(np.array(modes, dtype=np.int64), counts)
        is_xor = mode_el == _V_XOR
        num = ~is_xor
        num_counts = counts[np.array(modes) != _V_XOR]
        vn = v[num]
        with np.errstate(all="ignore"):
            p = np.repeat(np.array(_P10)[np.maximum(digits, 0)], counts)[num]
            m = np.rint(vn * p) + 0.0
            k = vn.view(np.int64) - (m / p).view(np.int64)
            bad = ~((np.abs(m) < _LIMIT52) & ((k + _KMAX).view(np.uint64) <= 2 * _KMAX))
            q = np.repeat(np.array(res), counts)[num]
            quant = q > 0
            if quant.any():
                # explicit lossy series: multiples of the resolution, |error| <= res / 2
                mq = np.rint(vn / q) + 0.0
                m = np.where(quant, mq, m)
                k[quant] = 0
                bad = np.where(quant, ~((np.abs(mq) < _LIMIT52)
                                        & (np.abs(mq * q - vn) <= q / 2)), bad)
        bad |= (vn == 0) & np.signbit(vn)
        has_exc = bool(bad.any())
        mi = _fill_forward(m, ~bad) if has_exc else m.astype(np.int64)
        parts.append(encode_segments(mi, num_counts))
        k[bad] = 0
        if k.any():
            gflags |= _G_ULP
            parts.append(encode_segments(k, num_counts))
        if has_exc:
            where = np.flatnonzero(bad)
            parts += [uvarint(where.size), encode_intcol(where.astype(np.int64)),
                      vn[where].tobytes()]
        else:
            parts.append(b"\x00")
        if is_xor.any():
            bits = v[is_xor].view(np.uint64)
            x = bits.copy()
            x[1:] ^= bits[:-1]
            xor_counts = counts[np.array(modes) == _V_XOR]
            xs = np.cumsum(xor_counts) - xor_counts
            x[xs] = bits[xs]
            parts.append(x.view(np.uint8).reshape(-1, 8).T.tobytes())

        # acceptance order: which series each reading belongs to, then the per-reading
        # columns in that order (seq is then usually an arithmetic progression)
        parts.append(_encode_pattern(sid0, s_count))
        parts.append(encode_intcol(seq))
        parts += [encode_intcol(col) for col in opt if col is not None]
        body = b"".join((uvarint(n), bytes([gflags]), *parts))
        ranges = (int(seq.min()), int(seq.max()), int(ts.min()), int(ts.max()))
        return self._seal(uvarint(s_count) + b"".join(names), body, max(res) / 2), ranges

    def _resolutions(self, keymap: dict[Any, int]) -> list[float]:
        """Per series, the declared lossy resolution (0.0 = exact)."""
        lossy = self.lossy_resolution
        if lossy is None:
            return [0.0] * len(keymap)
        if isinstance(lossy, float | int):
            return [float(lossy)] * len(keymap)
        return [float(lossy.get(k[0] if isinstance(k, tuple) else k, 0.0)) for k in keymap]

    def _seal(self, names: bytes, body: bytes, max_err: float) -> bytes:
        kind = ENTROPY[self.entropy]
        if kind == 0:
            packed = body
        elif kind == 1:
            packed = self._zc.compress(body)
        else:
            packed = lz4.block.compress(body, store_size=False)
        if len(packed) >= len(body):
            kind, packed = 0, body
        head = bytes([FORMAT])
        if max_err > 0:
            head += bytes([kind | _FLAG_LOSSY]) + struct.pack("<d", max_err)
        else:
            head += bytes([kind])
        return head + names + uvarint(len(body)) + packed

    # ---------------------------------------------------------------- decode
    def decode(self, payload: bytes, device_id: str, priority: Priority) -> list[Reading]:
        """Decode a payload; any malformed, truncated or oversized input is a DecodeError."""
        try:
            return self._decode(bytes(payload), device_id, priority)
        except DecodeError:
            raise
        except (ValueError, IndexError, OverflowError, TypeError, struct.error,
                zstandard.ZstdError, lz4.block.LZ4BlockError) as exc:
            raise DecodeError(f"malformed tsz chunk: {exc}", reason="malformed") from exc

    def decode_expecting(self, payload: bytes, device_id: str, priority: Priority,
                         count: int) -> list[Reading]:
        """Like :meth:`decode`, but a payload holding other than ``count`` points is
        refused (reason "count_mismatch") before anything is allocated for them."""
        try:
            return self._decode(bytes(payload), device_id, priority, count)
        except DecodeError:
            raise
        except (ValueError, IndexError, OverflowError, TypeError, struct.error,
                zstandard.ZstdError, lz4.block.LZ4BlockError) as exc:
            raise DecodeError(f"malformed tsz chunk: {exc}", reason="malformed") from exc

    def _decode(self, payload: bytes, device_id: str, priority: Priority,
                expected: int | None = None) -> list[Reading]:
        _, flags, max_err, cur = _header(payload)
        names = _decode_names(cur)
        body_len = cur.count(MAX_BODY)
        packed = payload[cur.pos:]
        kind = flags & 3
        if kind == 0:
            body = packed
        elif kind == 1:
            body = zstd_decompress(packed, body_len, dctx=self._zd)
        else:
            body = lz4.block.decompress(packed, uncompressed_size=body_len)
        if len(body) != body_len:
            raise DecodeError("chunk body length mismatch", reason="truncated")
        return _decode_body(Cursor(body), names, device_id, priority, max_err, expected)


_G_QUAL, _G_UNC, _G_RAW, _G_RAWMASK, _G_AGGW, _G_AGGC, _G_ULP = (1 << i for i in range(7))


def _decode_names(cur: Cursor) -> list[tuple[str, str | None, str]]:
    s_count = cur.count(cur.left)
    names: list[tuple[str, str | None, str]] = []
    for _ in range(s_count):
        is_agg = cur.u8()
        if is_agg > 1:
            raise DecodeError("bad series kind", reason="malformed")
        sensor = cur.string()
        names.append((sensor, cur.string(), cur.string()) if is_agg else (sensor, None, ""))
    return names


def _decode_body(cur: Cursor, names_t: list[tuple[str, str | None, str]], device_id: str,
                 priority: Priority, max_err: float | None,
                 expected: int | None = None) -> list[Reading]:
    n = cur.count(MAX_POINTS)
    if expected is not None and n != expected:
        raise DecodeError(f"chunk holds {n} points, its header says {expected}",
                          reason="count_mismatch")
    s_count = len(names_t)
    if s_count > n:
        raise DecodeError("more series than points", reason="malformed")
    gflags = cur.u8()
    if gflags >= 1 << 7:
        raise DecodeError(f"unknown chunk flags {gflags:#x}", reason="malformed")
    table: list[tuple[str, str | None, str, int, int, int]] = []
    res: list[float] = []
    for sensor, rule, fn in names_t:
        g = cur.uvarint()
        mode, d = cur.u8(), cur.u8()
        if mode > _V_LOSSY or d > _MAX_DIGITS:
            raise DecodeError("bad series value mode", reason="malformed")
        r = cur.f64() if mode == _V_LOSSY else 0.0
        if mode == _V_LOSSY and not (max_err is not None and 0 < r <= 2 * max_err):
            raise DecodeError("lossy series outside the declared error bound",
                              reason="malformed")
        table.append((sensor, rule, fn, g, mode, d))
        res.append(r)
    n_groups = cur.count(s_count)
    g_counts_l = [cur.count(n) for _ in range(n_groups)]
    if sum(g_counts_l) > n or (n_groups and min(g_counts_l) < 1):
        raise DecodeError("timestamp groups exceed the point count", reason="malformed")
    g_counts = np.array(g_counts_l, dtype=np.int64)
    g_ts = decode_segments(cur, g_counts)
    g_starts = np.cumsum(g_counts) - g_counts
    gi = np.array([t[3] for t in table], dtype=np.int64)
    if s_count and (int(gi.max()) >= n_groups):
        raise DecodeError("series names a missing timestamp group", reason="malformed")
    counts = g_counts[gi]
    if int(counts.sum()) != n:
        raise DecodeError("series do not add up to the point count", reason="malformed")
    ts = g_ts[np.repeat(g_starts[gi], counts) + (np.arange(n) - np.repeat(
        np.cumsum(counts) - counts, counts))] if n else g_ts

    modes = np.array([t[4] for t in table], dtype=np.int64)
    mode_el = np.repeat(modes, counts)
    is_xor = mode_el == _V_XOR
    num_counts = counts[modes != _V_XOR]
    m = decode_segments(cur, num_counts).astype(np.float64)
    p = np.repeat(np.array(_P10)[np.array([t[5] for t in table], np.int64)], counts)[~is_xor]
    vn = m / p
    if gflags & _G_ULP:
        vn = (vn.view(np.int64) + decode_segments(cur, num_counts)).view(np.float64)
    q = np.repeat(np.array(res), counts)[~is_xor]
    quant = q > 0
    if quant.any():
        vn = np.where(quant, m * q, vn)
    n_exc = cur.count(vn.size)
    if n_exc:
        where = decode_intcol(cur, n_exc)
        if int(where.min()) < 0 or int(where.max()) >= vn.size:
            raise DecodeError("exception index out of range", reason="malformed")
        vn[where] = np.frombuffer(cur.take(8 * n_exc), dtype=np.float64)
    v = np.empty(n, dtype=np.float64)
    v[~is_xor] = vn
    n_xor = int(is_xor.sum())
    if n_xor:
        planes = np.frombuffer(cur.take(8 * n_xor), dtype=np.uint8).reshape(8, n_xor)
        x = np.bitwise_xor.accumulate(np.ascontiguousarray(planes.T).view(np.uint64).ravel())
        xor_counts = counts[modes == _V_XOR]
        xs = np.cumsum(xor_counts) - xor_counts
        offs = np.zeros(xs.size, dtype=np.uint64)
        offs[1:] = x[xs[1:] - 1]
        v[is_xor] = (x ^ np.repeat(offs, xor_counts)).view(np.float64)

    sid0 = _decode_pattern(cur, n, counts)
    order = np.argsort(sid0, kind="stable")
    inv = np.empty(n, dtype=np.int64)
    inv[order] = np.arange(n)
    seq = decode_intcol(cur, n).tolist()
    opt: list[Any] = []
    for bit in (_G_QUAL, _G_UNC, _G_RAW, _G_RAWMASK, _G_AGGW, _G_AGGC):
        opt.append(decode_intcol(cur, n).tolist() if gflags & bit else None)
    qual, unc, raw, rawmask, aggw, aggc = opt
    if raw is not None and rawmask is not None:
        raw = [None if mk else r for r, mk in zip(raw, rawmask)]
    sid_l = sid0.tolist()
    names = [t[0] for t in table]
    sensors = [names[i] for i in sid_l]
    aggs: Any = repeat(None)
    if aggw is not None:
        rules = [(t[1], t[2]) for t in table]
        aggs = [None if rules[i][0] is None else AggInfo(rules[i][0], rules[i][1], w, c)
                for i, w, c in zip(sid_l, aggw, aggc)]
    out = [Reading(device_id, s, t, val, priority, q, r, ql, u, ag)
           for s, t, val, q, r, ql, u, ag in zip(
               sensors, ts[inv].tolist(), v[inv].tolist(), seq,
               repeat(None) if raw is None else raw,
               repeat(0) if qual is None else qual,
               repeat(0) if unc is None else unc,
               aggs)]
    if cur.left:
        raise DecodeError("trailing bytes after chunk body", reason="malformed")
    return out


def _register() -> None:
    from agent.codec.base import register

    register(TszCodec(3, "tsz-zstd", entropy="zstd"))
    register(TszCodec(4, "tsz-lz4", entropy="lz4"))


_register()
