"""Fuzz every decoder (envelope, chunk codecs, SenML) with garbage, truncations and bit
flips: the only exception allowed out is DecodeError (with a reason code)."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.codec import CODECS, codec_by_id, open_chunk, seal_chunk
from agent.codec.tsz import MAX_BODY, TszCodec
from pymigrate.envelope import Batch, decode_ack, decode_batch, encode_batch
from pymigrate.errors import DecodeError
from pymigrate.senml import parse_senml, to_senml_cbor, to_senml_json
from pymigrate.types import AggInfo, Chunk, Priority, Reading

EXAMPLES = int(os.environ.get("PYMIGRATE_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def sample() -> list[Reading]:
    out = []
    for i in range(50):
        out.append(Reading("dev", "temp", 1_700_000_000_000 + i * 1000, 20.5 + i * 0.1,
                           seq=2 * i + 1, quality=i % 3, raw_ts_ms=i if i % 2 else None))
        out.append(Reading("dev", "avg", 1_700_000_000_000 + i * 1000, float("nan"),
                           seq=2 * i + 2, agg=AggInfo("r", "avg", i, 4)))
    return out


PAYLOADS = {name: c.encode(sample()) for name, c in CODECS.items()}
ENVELOPE = encode_batch(Batch("dev", "b-1", [seal_chunk(sample(), "tsz-zstd")], 5))
SENML = {"json": to_senml_json(sample()[:10]), "cbor": to_senml_cbor(sample()[:10])}


def mutate(data: bytes, rnd: random.Random) -> bytes:
    buf = bytearray(data)
    kind = rnd.randrange(4)
    if kind == 0 and buf:  # truncate
        return bytes(buf[: rnd.randrange(len(buf))])
    if kind == 1 and buf:  # flip bits
        for _ in range(rnd.randint(1, 4)):
            buf[rnd.randrange(len(buf))] ^= 1 << rnd.randrange(8)
        return bytes(buf)
    if kind == 2 and buf:  # overwrite a byte with an extreme value
        buf[rnd.randrange(len(buf))] = rnd.choice([0, 0x7F, 0x80, 0xFF])
        return bytes(buf)
    return bytes(buf) + rnd.randbytes(rnd.randint(1, 16))  # append garbage


def only_decode_error(fn: object, data: bytes) -> None:
    try:
        fn(data)  # type: ignore[operator]
    except DecodeError as exc:
        assert exc.reason
        assert isinstance(exc.reason, str)


@pytest.mark.parametrize("name", sorted(PAYLOADS))
@FUZZ
@given(seed=st.integers(0, 2**32 - 1))
def test_codecs_mutated_payloads(name: str, seed: int) -> None:
    codec = CODECS[name]
    data = mutate(PAYLOADS[name], random.Random(seed))
    only_decode_error(lambda d: codec.decode(d, "dev", Priority.LOW), data)


@pytest.mark.parametrize("name", sorted(PAYLOADS))
@FUZZ
@given(data=st.binary(max_size=300))
def test_codecs_garbage(name: str, data: bytes) -> None:
    codec = CODECS[name]
    only_decode_error(lambda d: codec.decode(d, "dev", Priority.LOW), data)


@FUZZ
@given(body=st.binary(max_size=200), fmt=st.sampled_from([1]), flags=st.integers(0, 6))
def test_tsz_garbage_behind_a_valid_header(body: bytes, fmt: int, flags: int) -> None:
    from agent.codec._bits import uvarint

    data = bytes([fmt, flags]) + (b"\0" * 8 if flags & 4 else b"") + uvarint(len(body)) + body
    only_decode_error(lambda d: TszCodec().decode(d, "dev", Priority.LOW), data)


def test_every_truncation_of_every_payload() -> None:
    for name, payload in PAYLOADS.items():
        for cut in range(len(payload)):
            with pytest.raises(DecodeError):
                CODECS[name].decode(payload[:cut], "dev", Priority.LOW)
    for cut in range(len(ENVELOPE)):
        with pytest.raises(DecodeError):
            decode_batch(ENVELOPE[:cut])


def test_declared_sizes_are_checked_before_allocating() -> None:
    from agent.codec._bits import uvarint

    def payload(names: bytes, body: bytes, body_len: int | None = None) -> bytes:
        size = len(body) if body_len is None else body_len
        return bytes([1, 0]) + names + uvarint(size) + body

    with pytest.raises(DecodeError) as e:
        TszCodec().decode(payload(b"\x00", b"", MAX_BODY + 1), "d", Priority.LOW)
    assert e.value.reason == "oversized"
    # a body that claims a billion points in a few bytes
    with pytest.raises(DecodeError) as e:
        TszCodec().decode(payload(b"\x00", uvarint(10**9) + b"\x00"), "d", Priority.LOW)
    assert e.value.reason == "oversized"
    # a name table that claims more series than there are bytes
    with pytest.raises(DecodeError) as e:
        TszCodec().decode(bytes([1, 0]) + uvarint(10**6) + b"\x00\x01s", "d", Priority.LOW)
    assert e.value.reason in {"oversized", "truncated"}
    # a small body that claims a million points in one group but cannot hold them
    body = uvarint(10**6) + b"\x00" + b"\x00\x00\x00" + uvarint(1) + uvarint(10**6) + b"\x02"
    with pytest.raises(DecodeError) as e:
        TszCodec().decode(payload(b"\x01\x00\x01s", body), "d", Priority.LOW)
    assert e.value.reason == "truncated"


@FUZZ
@given(seed=st.integers(0, 2**32 - 1))
def test_envelope_mutations(seed: int) -> None:
    only_decode_error(decode_batch, mutate(ENVELOPE, random.Random(seed)))


@FUZZ
@given(data=st.binary(max_size=300))
def test_envelope_and_ack_garbage(data: bytes) -> None:
    only_decode_error(decode_batch, data)
    only_decode_error(decode_batch, b"PMIG\x02" + data)
    only_decode_error(decode_ack, data)


@pytest.mark.parametrize("fmt", ["json", "cbor"])
@FUZZ
@given(seed=st.integers(0, 2**32 - 1))
def test_senml_mutations(fmt: str, seed: int) -> None:
    data = mutate(SENML[fmt], random.Random(seed))
    only_decode_error(lambda d: parse_senml(d, content_format=fmt, device_id="d", now_ms=0),
                      data)


@pytest.mark.parametrize("fmt", ["json", "cbor"])
@FUZZ
@given(data=st.binary(max_size=200))
def test_senml_garbage(fmt: str, data: bytes) -> None:
    only_decode_error(lambda d: parse_senml(d, content_format=fmt, device_id="d", now_ms=0),
                      data)


def test_open_chunk_with_bad_codec_id_and_checksum() -> None:
    chunk = seal_chunk(sample())
    bad = Chunk(**{**{f: getattr(chunk, f) for f in chunk.__struct_fields__}, "codec": 250})
    with pytest.raises(DecodeError) as e:
        open_chunk(bad)
    assert e.value.reason == "unknown_codec"
    with pytest.raises(DecodeError):
        codec_by_id(99)


@pytest.mark.parametrize("data", [
    b"\x9b\x00\x00\x00\x01\x00\x00\x00\x00",  # array claiming 2**32 items
    b"\x5b\x00\x00\x00\x01\x00\x00\x00\x00",  # byte string claiming 4 GiB
    b"\xbb\x00\x00\x00\x01\x00\x00\x00\x00",  # map claiming 2**32 pairs
    b"\x81" * 100_000,  # nesting far past any sane depth
])
def test_senml_cbor_declared_lengths_and_depth(data: bytes) -> None:
    with pytest.raises(DecodeError) as e:
        parse_senml(data, content_format="cbor", device_id="d", now_ms=0)
    assert e.value.reason == "malformed"


def test_chunk_header_count_is_checked_before_decoding_points() -> None:
    chunk = seal_chunk(sample())
    fields = {f: getattr(chunk, f) for f in chunk.__struct_fields__}
    liar = Chunk(**{**fields, "count": 3})
    with pytest.raises(DecodeError) as e:
        open_chunk(liar)
    assert e.value.reason == "count_mismatch"
    legacy = seal_chunk(sample(), "columnar-zstd")
    with pytest.raises(DecodeError):
        open_chunk(Chunk(**{**{f: getattr(legacy, f) for f in legacy.__struct_fields__},
                            "count": 3}))
