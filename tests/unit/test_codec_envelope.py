"""The wire envelope: versions 1-3 round-trip, v3 compresses across chunks, and hostile
envelopes (valid checksum around bad bodies) fail with typed reasons."""

from __future__ import annotations

import os
import zlib

import msgspec
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.codec import seal_chunk
from pymigrate.envelope import (
    HEADER,
    MAGIC,
    TRAILER,
    VERSION,
    Batch,
    decode_ack,
    decode_batch,
    encode_ack,
    encode_batch,
)
from pymigrate.errors import DecodeError
from pymigrate.types import Ack, Chunk, Reading

EXAMPLES = int(os.environ.get("PYMIGRATE_FUZZ_EXAMPLES", "200"))


def batch(n_chunks: int = 8) -> Batch:
    chunks = [seal_chunk([Reading("dev", f"station/sensor_{i % 6}", 1_700_000_000_000 + i * 1000,
                                  20 + (i * 7 % 13) / 10, seq=i + 1)
                          for i in range(k * 60, (k + 1) * 60)]) for k in range(n_chunks)]
    return Batch("dev", "batch-1", chunks, 1_700_000_100_000)


def wrap(body: bytes, version: int) -> bytes:
    head = HEADER.pack(MAGIC, version, len(body))
    return head + body + TRAILER.pack(zlib.crc32(body, zlib.crc32(head)))


@pytest.mark.parametrize("version", [1, 2, 3, 4, 5])
def test_versions_roundtrip(version: int) -> None:
    b = batch()
    assert decode_batch(encode_batch(b, version=version)) == b
    assert b.count == 8 * 60


def test_default_v4_is_compressed_and_falls_back_to_v5_when_incompressible() -> None:
    b = batch()
    sizes = {v: len(encode_batch(b, version=v)) for v in (1, 2, 3, 4)}
    assert VERSION == 4
    assert sizes[3] < sizes[2] < sizes[1]
    assert sizes[4] <= sizes[3] + 8  # the stream identity costs a few bytes
    tiny = Batch("d", "x", [seal_chunk([Reading("d", "s", 1, 1.0, seq=1)])])
    data = encode_batch(tiny)
    assert data[4] in {4, 5}
    assert decode_batch(data) == tiny
    with pytest.raises(ValueError):
        encode_batch(b, version=7)


def test_v3_bomb_and_undeclared_sizes_are_refused() -> None:
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (2 * 1024 * 1024))
    with pytest.raises(DecodeError) as e:
        decode_batch(wrap(bomb, 3), max_bytes=1024 * 1024)
    assert e.value.reason == "oversized"
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(b"\x90")
    with pytest.raises(DecodeError) as e:
        decode_batch(wrap(no_size, 3))
    assert e.value.reason == "malformed"
    with pytest.raises(DecodeError) as e:
        decode_batch(wrap(b"not zstd", 3))
    assert e.value.reason == "malformed"


def chunk(**kw: object) -> Chunk:
    base = {"device_id": "d", "priority": 2, "seq_first": 1, "seq_last": 5, "count": 5,
            "ts_first": 10, "ts_last": 20, "codec": 3, "payload": b"x", "checksum": 1}
    base.update(kw)
    return Chunk(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [
    {"seq_last": 0}, {"ts_last": 5}, {"count": 0}, {"count": 10**7}, {"codec": 300},
    {"checksum": -1}, {"checksum": 2**32}, {"seq_first": 2**63, "seq_last": 2**63 + 1},
])
def test_inconsistent_chunk_headers_are_rejected(bad: dict[str, object]) -> None:
    b = Batch("d", "b", [chunk(**bad)])
    for version in (1, 2):
        with pytest.raises(DecodeError) as e:
            decode_batch(encode_batch(b, version=version))
        assert e.value.reason == "malformed"


def test_device_mismatch_and_header_errors() -> None:
    with pytest.raises(DecodeError) as e:
        decode_batch(encode_batch(Batch("d", "b", [chunk(device_id="other")]), version=1))
    assert e.value.reason == "device_mismatch"
    good = encode_batch(batch(1))
    cases = {"bad_magic": b"XXXX" + good[4:], "bad_version": good[:4] + b"\x09" + good[5:],
             "truncated": good[:-1], "checksum": good[:-1] + bytes([good[-1] ^ 1])}
    for reason, data in cases.items():
        with pytest.raises(DecodeError) as e:
            decode_batch(data)
        assert e.value.reason == reason
    with pytest.raises(DecodeError) as e:
        decode_batch(good, max_bytes=10)
    assert e.value.reason == "oversized"


@settings(max_examples=EXAMPLES, deadline=None)
@given(body=st.binary(max_size=300), version=st.sampled_from([1, 2, 3]))
def test_valid_checksum_around_garbage(body: bytes, version: int) -> None:
    try:
        decode_batch(wrap(body, version))
    except DecodeError as exc:
        assert exc.reason


@settings(max_examples=EXAMPLES, deadline=None)
@given(items=st.lists(st.one_of(st.integers(-(2**63), 2**64 - 1), st.binary(max_size=8),
                                st.text(max_size=4)),
                      max_size=12))
def test_structured_garbage_bodies(items: list[object]) -> None:
    raw = msgspec.msgpack.encode(["d", "b", 0, [items]])
    for version, body in ((2, raw), (3, zstandard.ZstdCompressor().compress(raw))):
        try:
            decode_batch(wrap(body, version))
        except DecodeError as exc:
            assert exc.reason


def test_ack_roundtrip_and_garbage() -> None:
    ack = Ack("b", "ok", 1, 2, accepted=3)
    assert decode_ack(encode_ack(ack)) == ack
    with pytest.raises(DecodeError):
        decode_ack(b"{")


def test_batch_point_cap() -> None:
    b = batch(4)
    assert decode_batch(encode_batch(b), max_points=240) == b
    with pytest.raises(DecodeError) as e:
        decode_batch(encode_batch(b), max_points=239)
    assert e.value.reason == "oversized"


def test_v4_carries_stream_identity_and_gaps_and_checks_them() -> None:
    from pymigrate.types import Gap
    g = Gap(3, 9, 5, "evicted", 1000, [(3, 4), (7, 9)], "budget")
    b = Batch("d", "x", [], 5, "0123456789abcdef", 1, 12, [g])
    out = decode_batch(encode_batch(b))
    assert out == b and out.gaps[0].exact
    with pytest.raises(ValueError):
        encode_batch(b, version=3)  # an old version cannot carry them: refuse, never drop
    bad = [Gap(3, 9, 6, "evicted", 0, [(3, 4), (7, 9)]),  # count disagrees with runs
           Gap(3, 9, 5, "evicted", 0, [(4, 4), (7, 9)]),  # runs do not start the range
           Gap(9, 3, 1, "evicted", 0),  # reversed
           Gap(0, 3, 1, "evicted", 0),  # seq 0 is never issued
           Gap(3, 9, 3, "", 0)]  # no reason
    for g in bad:
        with pytest.raises(DecodeError) as e:
            decode_batch(encode_batch(Batch("d", "x", [], 5, "i" * 16, 1, 12, [g])))
        assert e.value.reason == "malformed"
