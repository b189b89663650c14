"""Vectorised integer-column primitives for the tsz codec: zigzag, LEB128 varints and
self-describing integer columns (constant, arithmetic progression, delta, delta-of-delta).

All arithmetic is done on ``uint64`` so differences of arbitrary int64 values wrap
modulo 2**64 and invert exactly (no overflow, no numpy warnings). Every read goes
through :class:`Cursor`, which checks lengths against the bytes left before it
allocates anything.
"""

from __future__ import annotations

import struct

import numpy as np
import numpy.typing as npt

from pymigrate.errors import DecodeError

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]
F64 = npt.NDArray[np.float64]

_ONE = np.uint64(1)
_SH63 = np.uint64(63)
_THRESH = np.array([1 << (7 * t) for t in range(1, 10)], dtype=np.uint64)

# integer column modes
COL_CONST = 0  # every value equal: x0
COL_AP = 1  # arithmetic progression: x0, step
COL_RAW = 2  # varint(zigzag(x))
COL_DELTA = 3  # x0, varint(zigzag(diff))
COL_DOD = 4  # x0, d1, varint(zigzag(diff of diff))
MAX_POINTS = 1_000_000  # refuse to declare more points than this in one chunk


def zigzag(x: U64) -> U64:
    """Map signed (as wrapped uint64) to unsigned so small magnitudes get small codes."""
    sign = (x >> _SH63) * np.uint64(0xFFFFFFFFFFFFFFFF)
    return (x << _ONE) ^ sign


def unzigzag(z: U64) -> U64:
    return (z >> _ONE) ^ (np.uint64(0) - (z & _ONE))


def varint_encode(z: U64) -> bytes:
    """LEB128-encode an unsigned array, vectorised (one pass per output byte column)."""
    n = z.size
    if n == 0:
        return b""
    extra = np.searchsorted(_THRESH, z, side="right")  # bytes beyond the first
    maxb = int(extra.max()) + 1
    if maxb == 1:
        one: bytes = z.astype(np.uint8).tobytes()
        return one
    out = np.empty((n, maxb), dtype=np.uint8)
    for b in range(maxb):
        col = (z >> np.uint64(7 * b)).astype(np.uint8) & np.uint8(0x7F)
        col |= (extra > b).view(np.uint8) << np.uint8(7)
        out[:, b] = col
    res: bytes = out[np.arange(maxb) <= extra[:, None]].tobytes()
    return res


def uvarint(value: int) -> bytes:
    """Encode one unsigned int (< 2**64) as LEB128."""
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def svarint(value: int) -> bytes:
    """Encode one signed int64 as zigzag LEB128."""
    return uvarint(((value << 1) ^ (value >> 63)) & 0xFFFFFFFFFFFFFFFF)


class Cursor:
    """Bounds-checked reader over a body; every failure is a :class:`DecodeError`."""

    __slots__ = ("arr", "buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.arr: U8 = np.frombuffer(buf, dtype=np.uint8)
        self.pos = 0

    @property
    def left(self) -> int:
        return len(self.buf) - self.pos

    def take(self, n: int) -> bytes:
        if n < 0 or n > self.left:
            raise DecodeError("chunk body truncated", reason="truncated")
        out = self.buf[self.pos: self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        if self.pos >= len(self.buf):
            raise DecodeError("chunk body truncated", reason="truncated")
        b = self.buf[self.pos]
        self.pos += 1
        return b

    def f64(self) -> float:
        (v,) = struct.unpack("<d", self.take(8))
        return float(v)

    def uvarint(self) -> int:
        result = 0
        shift = 0
        while True:
            b = self.u8()
            result |= (b & 0x7F) << shift
            if b < 0x80:
                break
            shift += 7
            if shift > 63:
                raise DecodeError("varint too long", reason="malformed")
        if result > 0xFFFFFFFFFFFFFFFF:
            raise DecodeError("varint overflows 64 bits", reason="malformed")
        return result

    def svarint(self) -> int:
        z = self.uvarint()
        v = (z >> 1) ^ -(z & 1)
        return v

    def count(self, limit: int) -> int:
        """A declared element count, refused when above ``limit``."""
        n = self.uvarint()
        if n > limit:
            raise DecodeError(f"declared count {n} exceeds limit {limit}", reason="oversized")
        return n

    def string(self) -> str:
        n = self.count(self.left)
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError("invalid utf-8 string in chunk", reason="malformed") from exc

    def varints(self, n: int) -> U64:
        """Decode ``n`` LEB128 values (each takes >= 1 byte, so n is bounded by bytes left)."""
        if n == 0:
            return np.zeros(0, dtype=np.uint64)
        if n > self.left:
            raise DecodeError("varint column truncated", reason="truncated")
        window = self.arr[self.pos: self.pos + 10 * n]
        term = np.flatnonzero(window < 0x80)
        if term.size < n:
            raise DecodeError("varint column truncated", reason="truncated")
        end = int(term[n - 1]) + 1
        w = window[:end]
        self.pos += end
        if end == n:
            return w.astype(np.uint64)
        starts = np.empty(n, dtype=np.int64)
        starts[0] = 0
        starts[1:] = term[: n - 1] + 1
        lens = term[:n] + 1 - starts
        if int(lens.max()) > 10:
            raise DecodeError("varint too long", reason="malformed")
        elem = np.repeat(np.arange(n), lens)
        pos = (np.arange(end) - starts[elem]).astype(np.uint64)
        vals = (w & 0x7F).astype(np.uint64) << (pos * np.uint64(7))
        out: U64 = np.bitwise_or.reduceat(vals, starts)
        return out


def _segcumsum(e: U64, starts: I64, counts: I64) -> U64:
    cs = np.cumsum(e, dtype=np.uint64)
    offs = np.zeros(starts.size, dtype=np.uint64)
    offs[1:] = cs[starts[1:] - 1]
    out: U64 = cs - np.repeat(offs, counts)
    return out


_LEVEL = np.array([1, 2, 0, 1, 2], dtype=np.int64)  # cumsum depth per column mode


def _encode_single(x: I64) -> bytes:
    """Fast path of :func:`encode_segments` for one segment (same format)."""
    u = x.view(np.uint64)
    x0 = u[:1]
    if x.size == 1:
        return bytes([COL_CONST]) + varint_encode(zigzag(x0))
    d = np.diff(u)
    if not d.any():
        return bytes([COL_CONST]) + varint_encode(zigzag(x0))
    dd = np.diff(d)
    if not dd.any():
        return bytes([COL_AP]) + varint_encode(zigzag(np.concatenate((x0, d[:1]))))
    zs = (zigzag(u), zigzag(np.concatenate((x0, d))), zigzag(np.concatenate((x0, d[:1], dd))))
    lens = np.searchsorted(_THRESH, np.concatenate(zs), side="right").reshape(3, -1).sum(axis=1)
    best = int(np.argmin(lens))
    return bytes([(COL_RAW, COL_DELTA, COL_DOD)[best]]) + varint_encode(zs[best])


def encode_segments(x: I64, counts: I64) -> bytes:
    """Encode consecutive int64 segments (lengths ``counts``, each >= 1).

    Each segment picks CONST / AP / RAW / DELTA / DOD by varint size; the output is one
    mode byte per segment followed by a single varint stream, all computed vectorised.
    """
    n = x.size
    if n == 0:
        return b""
    if counts.size == 1:
        return _encode_single(x)
    ends = np.cumsum(counts)
    starts = ends - counts
    u = x.view(np.uint64)
    head = np.zeros(n, dtype=bool)
    head[starts] = True
    head2 = head.copy()
    head2[starts[counts > 1] + 1] = True
    d1 = u.copy()
    d1[1:] -= u[:-1]
    d1[head] = u[head]
    d2 = d1.copy()
    d2[1:] -= d1[:-1]
    d2[head2] = d1[head2]
    z = np.stack((zigzag(u), zigzag(d1), zigzag(d2)))
    stats = np.empty((5, n + 1), dtype=np.int64)
    stats[:, 0] = 0
    stats[:3, 1:] = np.searchsorted(_THRESH, z.ravel(), side="right").reshape(3, n)
    stats[3, 1:] = (d1 != 0) & ~head
    stats[4, 1:] = (d2 != 0) & ~head2
    cs = np.cumsum(stats, axis=1)
    seg = cs[:, ends] - cs[:, starts]
    mode = np.array([COL_RAW, COL_DELTA, COL_DOD], dtype=np.int64)[np.argmin(seg[:3], axis=0)]
    mode[seg[4] == 0] = COL_AP
    mode[seg[3] == 0] = COL_CONST
    keep = np.where(mode == COL_CONST, 1, np.where(mode == COL_AP, np.minimum(counts, 2), counts))
    lvl = np.repeat(_LEVEL[mode], counts)
    pos = np.arange(n) - np.repeat(starts, counts)
    mask = pos < np.repeat(keep, counts)
    sel = z[lvl, np.arange(n)]
    modes: bytes = mode.astype(np.uint8).tobytes()
    return modes + varint_encode(sel[mask])


def decode_segments(cur: Cursor, counts: I64) -> I64:
    """Inverse of :func:`encode_segments`; ``counts`` were validated by the caller."""
    s = counts.size
    n = int(counts.sum())
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if int(counts.min()) < 1:
        raise DecodeError("empty segment", reason="malformed")
    mode = np.frombuffer(cur.take(s), dtype=np.uint8).astype(np.int64)
    if int(mode.max()) > COL_DOD:
        raise DecodeError("unknown integer column mode", reason="malformed")
    keep = np.where(mode == COL_CONST, 1, np.where(mode == COL_AP, np.minimum(counts, 2), counts))
    k = int(keep.sum())
    vals = unzigzag(cur.varints(k))
    ends = np.cumsum(counts)
    starts = ends - counts
    kends = np.cumsum(keep)
    kidx = np.repeat(starts, keep) + (np.arange(k) - np.repeat(kends - keep, keep))
    e = np.zeros(n, dtype=np.uint64)
    e[kidx] = vals
    # DOD/AP store the first delta itself, not its difference from x0: undo that here
    fix = starts[(_LEVEL[mode] == 2) & (counts > 1)]
    e[fix + 1] -= e[fix]
    lvl = np.repeat(_LEVEL[mode], counts)
    c1 = _segcumsum(e, starts, counts)
    c2 = _segcumsum(c1, starts, counts)
    out: U64 = np.where(lvl == 0, e, np.where(lvl == 1, c1, c2))
    return out.view(np.int64)


def encode_intcol(x: I64) -> bytes:
    """One int64 column (a single segment)."""
    return encode_segments(x, np.array([x.size], dtype=np.int64)) if x.size else b""


def decode_intcol(cur: Cursor, n: int) -> I64:
    """Inverse of :func:`encode_intcol` for ``n`` values."""
    return decode_segments(cur, np.array([n], dtype=np.int64)) if n else np.zeros(0, np.int64)
