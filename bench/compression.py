"""Compression benchmark: ``python -m bench compression --dataset CSV [--chunk-points N]
[--codec NAME] [--batch-bytes B]``.

Replays a CSV (first column ISO 8601 timestamp, every other column a numeric sensor,
empty cell = missing) as one device: rows in time order, each row's sensors in column
order, sequence numbers 1..N, cut into chunks of N readings as the agent's chunker
does. Each chunk is sealed with the codec and packed into wire envelopes (batches up to
``--batch-bytes``, default 64 KiB, as the uploader packs them); ``bytes_per_point`` is
envelope bytes / points (``bytes_per_point_one_chunk_per_batch``: one chunk per envelope,
``payload_bytes_per_point``: chunk payloads alone, what the buffer stores). Peers get the
same chunks and no envelope (in their favour): raw16 (int64 ms + float64), lz4 and zstd-3
on raw16, a Gorilla (VLDB 2015) bit count, pcodec on each series' timestamp and value
columns per chunk, JSON lines + zstd-3, and line protocol + gzip in batches of 1000.
Per series: that series alone, cut at the same chunk boundaries.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import itertools
import struct
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import lz4.block
import msgspec
import numpy as np
import zstandard

from agent.codec import TszCodec, codec_by_name, open_chunk, seal_chunk
from bench.common import emit
from pymigrate.envelope import Batch, encode_batch
from pymigrate.lineproto import to_line_protocol
from pymigrate.types import Chunk, Priority, Reading


def load_csv(path: Path) -> tuple[str, list[str], list[Reading]]:
    """Readings in acceptance order; float text kept exactly as Python parses it."""
    device = path.stem
    readings: list[Reading] = []
    with path.open(newline="") as fh:
        rows = csv.reader(fh)
        header = next(rows)
        sensors = header[1:]
        seq = 0
        for row in rows:
            ts = datetime.fromisoformat(row[0].replace("Z", "+00:00"))
            ts_ms = int(ts.timestamp() * 1000)
            for name, cell in zip(sensors, row[1:]):
                if cell == "":
                    continue
                seq += 1
                readings.append(Reading(device, name, ts_ms, float(cell), Priority.NORMAL, seq))
    return device, sensors, readings


def chunked(readings: Sequence[Reading], n: int) -> list[list[Reading]]:
    return [list(readings[i: i + n]) for i in range(0, len(readings), n)]


def envelope_bytes(device: str, chunks: list[Chunk],
                   batch_bytes: int) -> tuple[int, int, float]:
    """(bytes packed into batches of <= batch_bytes before compression, bytes with one
    chunk per batch, CPU seconds spent encoding the packed batches)."""
    def batch(cs: list[Chunk]) -> bytes:
        return encode_batch(Batch(device, uuid.uuid4().hex, cs, 1_767_600_000_000))

    one = sum(len(batch([c])) for c in chunks)
    groups: list[list[Chunk]] = []
    size = batch_bytes
    for c in chunks:
        est = len(c.payload) + 48  # chunk header fields in the envelope body
        if size + est > batch_bytes:
            groups.append([])
            size = 64
        groups[-1].append(c)
        size += est
    t0 = time.process_time()
    packed = sum(len(batch(g)) for g in groups)
    return packed, one, time.process_time() - t0


def same(a: Reading, b: Reading) -> bool:
    return (struct.pack("<d", a.value) == struct.pack("<d", b.value)
            and msgspec.structs.replace(a, value=0.0) == msgspec.structs.replace(b, value=0.0))


# ------------------------------------------------------------------ peers
def _raw16(rs: Sequence[Reading]) -> bytes:
    ts = np.array([r.ts_ms for r in rs], dtype=np.int64)
    v = np.array([r.value for r in rs], dtype=np.float64)
    out = np.empty(len(rs), dtype=[("t", "<i8"), ("v", "<f8")])
    out["t"], out["v"] = ts, v
    return out.tobytes()


def _by_series(rs: Sequence[Reading]) -> dict[str, list[Reading]]:
    out: dict[str, list[Reading]] = defaultdict(list)
    for r in rs:
        out[r.sensor].append(r)
    return out


def gorilla_bits(ts: Sequence[int], vals: Sequence[float]) -> int:
    """Size in bits of a Gorilla (Facebook, VLDB 2015) encoding of one series."""
    bits = 64 + 64
    if len(ts) > 1:
        bits += 14
    prev_d = ts[1] - ts[0] if len(ts) > 1 else 0
    for i in range(2, len(ts)):
        d = ts[i] - ts[i - 1]
        dod = d - prev_d
        prev_d = d
        if dod == 0:
            bits += 1
        elif -63 <= dod <= 64:
            bits += 9
        elif -255 <= dod <= 256:
            bits += 12
        elif -2047 <= dod <= 2048:
            bits += 16
        else:
            bits += 36 if -(2**31) <= dod < 2**31 else 68
    words = [struct.unpack("<Q", struct.pack("<d", v))[0] for v in vals]
    lead, trail = -1, -1
    for prev, w in itertools.pairwise(words):
        x = prev ^ w
        if x == 0:
            bits += 1
            continue
        lz = min(64 - x.bit_length(), 31)
        tz = (x & -x).bit_length() - 1
        if lead >= 0 and lz >= lead and tz >= trail:
            bits += 2 + 64 - lead - trail
        else:
            lead, trail = lz, tz
            bits += 2 + 5 + 6 + 64 - lz - tz
    return bits


def peer_sizes(chunks: list[list[Reading]]) -> dict[str, int]:
    from pcodec import ChunkConfig, standalone

    zc = zstandard.ZstdCompressor(level=3)
    sizes = dict.fromkeys(("lz4", "zstd", "gorilla", "pcodec", "jsonl_zstd"), 0)
    jenc = msgspec.json.Encoder()
    for rs in chunks:
        raw = _raw16(rs)
        sizes["lz4"] += len(lz4.block.compress(raw, store_size=False))
        sizes["zstd"] += len(zc.compress(raw))
        lines = b"".join(jenc.encode({"sensor": r.sensor, "ts_ms": r.ts_ms, "value": r.value})
                         + b"\n" for r in rs)
        sizes["jsonl_zstd"] += len(zc.compress(lines))
        for srs in _by_series(rs).values():
            ts = [r.ts_ms for r in srs]
            vals = [r.value for r in srs]
            sizes["gorilla"] += (gorilla_bits(ts, vals) + 7) // 8
            cfg = ChunkConfig()
            sizes["pcodec"] += len(standalone.simple_compress(np.array(ts, np.int64), cfg))
            sizes["pcodec"] += len(standalone.simple_compress(np.array(vals, np.float64), cfg))
    return sizes


def lp_gzip_size(readings: Sequence[Reading], batch: int = 1000) -> int:
    total = 0
    for i in range(0, len(readings), batch):
        text = to_line_protocol(readings[i: i + batch], "readings", precision="ns")
        total += len(gzip.compress(text.encode()))
    return total


# ------------------------------------------------------------------ main
def measure(readings: list[Reading], device: str, chunk_points: int, codec: str,
            batch_bytes: int, repeats: int = 3,
            lossy_resolution: float | None = None) -> dict[str, Any]:
    c = codec_by_name(codec)
    if lossy_resolution is not None:
        if not isinstance(c, TszCodec):
            raise SystemExit("--lossy-resolution needs a tsz codec")
        c = TszCodec(c.codec_id, c.name, entropy=c.entropy, lossy_resolution=lossy_resolution)
    chunks_r = chunked(readings, chunk_points)
    n = len(readings)
    for rs in chunks_r[:3]:  # warm-up
        open_chunk(seal_chunk(rs, c))
    # CPU time of this process, best of `repeats` (the figure is per-core cost; wall time
    # on a shared machine mostly measures the neighbours)
    enc = dec = wall_enc = float("inf")
    sealed: list[Chunk] = []
    opened: list[list[Reading]] = []
    for _ in range(repeats):
        w0, t0 = time.perf_counter(), time.process_time()
        sealed = [seal_chunk(rs, c) for rs in chunks_r]
        t1, w1 = time.process_time(), time.perf_counter()
        opened = [open_chunk(ch) for ch in sealed]
        t2 = time.process_time()
        enc, dec, wall_enc = min(enc, t1 - t0), min(dec, t2 - t1), min(wall_enc, w1 - w0)
    exact = all(len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
                for a, b in zip(chunks_r, opened))
    max_err = max(abs(x.value - y.value) for a, b in zip(chunks_r, opened)
                  for x, y in zip(a, b))
    packed, one, env_cpu = envelope_bytes(device, sealed, batch_bytes)
    payload = sum(len(ch.payload) for ch in sealed)
    peers = peer_sizes(chunks_r)
    peers["line_protocol_gzip"] = lp_gzip_size(readings)
    raw16 = 16 * n
    per_series: dict[str, Any] = {}
    for name, srs in _by_series(readings).items():
        # that series alone, cut at the same chunk boundaries
        s_chunks = [ch for ch in ([r for r in rs if r.sensor == name] for rs in chunks_r) if ch]
        s_sealed = [seal_chunk(rs, c) for rs in s_chunks]
        s_bytes, _, _ = envelope_bytes(device, s_sealed, batch_bytes)
        per_series[name] = {
            "points": len(srs),
            "bytes_per_point": round(s_bytes / len(srs), 4),
            "reduction_vs_raw16": round(1 - s_bytes / (16 * len(srs)), 4),
        }
    return {
        "points": n,
        "series": len(per_series),
        "chunks": len(sealed),
        "bytes_per_point": round(packed / n, 4),
        "bytes_per_point_one_chunk_per_batch": round(one / n, 4),
        "payload_bytes_per_point": round(payload / n, 4),
        "reduction_vs_raw16": round(1 - packed / raw16, 4),
        "reduction_vs_jsonl_zstd": round(1 - packed / peers["jsonl_zstd"], 4),
        "reduction_vs_line_protocol_gzip": round(1 - packed / peers["line_protocol_gzip"], 4),
        "roundtrip_exact": exact,
        "max_abs_error": max_err,
        "encode_us_per_point": round(enc * 1e6 / n, 3),
        "decode_us_per_point": round(dec * 1e6 / n, 3),
        "encode_wall_us_per_point": round(wall_enc * 1e6 / n, 3),
        "envelope_us_per_point": round(env_cpu * 1e6 / n, 3),
        "peers_bytes_per_point": {"raw16": 16.0, **{k: round(v / n, 4) for k, v in peers.items()}},
        "per_series": per_series,
    }


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench compression")
    ap.add_argument("--dataset", required=True, type=Path, help="replay-format CSV")
    ap.add_argument("--chunk-points", type=int, default=600)
    ap.add_argument("--codec", default=None, help="codec name (default: the default codec)")
    ap.add_argument("--batch-bytes", type=int, default=65536)
    ap.add_argument("--repeats", type=int, default=3, help="timing runs (best is kept)")
    ap.add_argument("--lossy-resolution", type=float, default=None,
                    help="explicit lossy mode: quantize every series to this resolution")
    args = ap.parse_args(argv)
    from agent.codec import DEFAULT_CODEC

    codec = args.codec or DEFAULT_CODEC
    device, _, readings = load_csv(args.dataset)
    if not readings:
        print("dataset has no readings")
        return 2
    results = measure(readings, device, args.chunk_points, codec, args.batch_bytes,
                      args.repeats, args.lossy_resolution)
    emit("compression", {"dataset": args.dataset.name, "chunk_points": args.chunk_points,
                         "codec": codec, "batch_bytes": args.batch_bytes,
                         "lossy_resolution": args.lossy_resolution,
                         "timing": "CPU time, best of repeats"}, results)
    return 0
