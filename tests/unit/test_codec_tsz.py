"""The tsz codec: exact round trips (hypothesis), format details, lossy mode, size."""

from __future__ import annotations

import math
import os
import struct

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.codec import DEFAULT_CODEC, codec_by_id, codec_by_name, open_chunk, seal_chunk
from agent.codec.tsz import TszCodec, chunk_meta
from pymigrate.errors import DecodeError
from pymigrate.types import AggInfo, Priority, Reading

EXAMPLES = int(os.environ.get("PYMIGRATE_FUZZ_EXAMPLES", "100"))  # more: set the variable
I64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
SMALL_OR_ANY = st.one_of(st.integers(-3, 3), I64)  # small ranges give duplicates and reversals


def bits(x: float) -> bytes:
    return struct.pack("<d", x)


def assert_same(a: list[Reading], b: list[Reading]) -> None:
    """Equal field by field, values bit for bit (NaN payloads and -0.0 included)."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert bits(x.value) == bits(y.value), (x, y)
        assert msgspec.structs.replace(x, value=0.0) == msgspec.structs.replace(y, value=0.0)


any_float = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(0, 2**64 - 1).map(lambda u: struct.unpack("<d", struct.pack("<Q", u))[0]),
    st.decimals(places=3, min_value=-10**6, max_value=10**6, allow_nan=False,
                allow_infinity=False).map(float),
)

agg = st.one_of(st.none(), st.builds(AggInfo, st.sampled_from(["r1", "r2", ""]),
                                     st.sampled_from(["avg", "max", ""]), I64, I64))


@st.composite
def readings(draw: st.DrawFn) -> list[Reading]:
    n = draw(st.integers(1, 60))
    sensors = draw(st.lists(st.text(min_size=0, max_size=8), min_size=1, max_size=4))
    prio = draw(st.sampled_from(list(Priority)))
    out = []
    for _ in range(n):
        out.append(Reading(
            "dev-1", draw(st.sampled_from(sensors)), draw(SMALL_OR_ANY), draw(any_float), prio,
            seq=draw(SMALL_OR_ANY), raw_ts_ms=draw(st.one_of(st.none(), I64)),
            quality=draw(st.one_of(st.just(0), I64)), uncert_ms=draw(st.one_of(st.just(0), I64)),
            agg=draw(agg)))
    return out


@pytest.mark.parametrize("name", ["tsz-zstd", "tsz-lz4"])
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rs=readings())
def test_roundtrip_arbitrary_series_bit_exact(name: str, rs: list[Reading]) -> None:
    chunk = seal_chunk(rs, name)
    assert (chunk.seq_first, chunk.seq_last) == (min(r.seq for r in rs), max(r.seq for r in rs))
    assert (chunk.ts_first, chunk.ts_last) == (min(r.ts_ms for r in rs),
                                               max(r.ts_ms for r in rs))
    assert chunk.count == len(rs)
    assert_same(rs, open_chunk(chunk))


@settings(max_examples=EXAMPLES, deadline=None)
@given(start=I64, step=st.integers(-10**6, 10**6), vals=st.lists(any_float, min_size=1,
                                                                  max_size=300))
def test_roundtrip_regular_series(start: int, step: int, vals: list[float]) -> None:
    rs = [Reading("d", "s", (start + i * step) % 2**63, v, seq=i + 1) for i, v in enumerate(vals)]
    assert_same(rs, open_chunk(seal_chunk(rs, "tsz-zstd")))


def weather(rows: int = 40) -> list[Reading]:
    out = []
    seq = 0
    for i in range(rows):
        for name, v in (("temp", 20 + (i % 7) * 0.1), ("rh", 50.25 + i * 0.01),
                        ("p", 927.9630000000001 if i % 3 else 927.963), ("wind", float(i % 4))):
            seq += 1
            out.append(Reading("dev", name, 1_700_000_000_000 + i * 60_000, v, seq=seq))
    return out


def test_default_codec_is_tsz_and_much_smaller_than_raw() -> None:
    rs = weather()
    chunk = seal_chunk(rs)
    assert codec_by_id(chunk.codec).name == DEFAULT_CODEC
    assert DEFAULT_CODEC.startswith("tsz")
    assert len(chunk.payload) < 0.1 * 16 * len(rs)
    assert_same(rs, open_chunk(chunk))


def test_special_values_and_orders() -> None:
    nan_payload = struct.unpack("<d", struct.pack("<Q", 0x7FF8_0000_0000_1234))[0]
    specials = [nan_payload, -0.0, 0.0, math.inf, -math.inf, 5e-324, 1.7976931348623157e308,
                0.1 + 0.2, 1e16, -1e-300]
    rs = [Reading("d", "x", 1000 - i, v, seq=5 - i % 3) for i, v in enumerate(specials)]
    out = open_chunk(seal_chunk(rs, "tsz-lz4"))
    assert_same(rs, out)


def test_optional_columns_cost_almost_nothing_when_default() -> None:
    rs = weather()
    plain = len(TszCodec(entropy="zstd").encode(rs))
    flagged = [msgspec.structs.replace(r, quality=1) for r in rs]
    assert len(TszCodec(entropy="zstd").encode(flagged)) <= plain + 12


def test_mixed_raw_ts_and_aggregates_roundtrip() -> None:
    rs = [Reading("d", "s", 10 * i, i * 0.5, seq=i, raw_ts_ms=None if i % 2 else i,
                  agg=AggInfo("rule", "avg", 10 * i + 5, 3) if i % 3 else None)
          for i in range(1, 30)]
    assert_same(rs, open_chunk(seal_chunk(rs, "tsz-zstd")))


def test_lossy_mode_bounds_error_and_records_it() -> None:
    codec = TszCodec(3, "tsz-zstd", lossy_resolution=0.1)
    rs = [Reading("d", "t", i * 1000, 20 + math.sin(i / 10) * 5, seq=i + 1) for i in range(500)]
    rs.append(Reading("d", "t", 501_000, math.nan, seq=502))
    chunk = seal_chunk(rs, codec)
    meta = chunk_meta(chunk.payload)
    assert meta.max_abs_err == pytest.approx(0.05)
    exact = chunk_meta(seal_chunk(rs, "tsz-zstd").payload)
    assert exact.max_abs_err is None
    out = open_chunk(chunk)  # decodes through the registered id-3 codec
    assert math.isnan(out[-1].value)
    assert max(abs(a.value - b.value) for a, b in zip(rs[:-1], out[:-1])) <= 0.05
    assert len(chunk.payload) < len(seal_chunk(rs, "tsz-zstd").payload)


def test_lz4_and_zstd_payloads_decode_through_either_id() -> None:
    rs = weather(10)
    payload = codec_by_name("tsz-lz4").encode(rs)
    assert chunk_meta(payload).entropy in {"lz4", "none"}
    assert_same(rs, codec_by_name("tsz-zstd").decode(payload, "dev", Priority.NORMAL))


def test_encode_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        TszCodec().encode([])
    with pytest.raises(ValueError):
        TszCodec().encode([Reading("d", "s", 2**70, 1.0)])
    with pytest.raises(ValueError):
        TszCodec(entropy="brotli")
    with pytest.raises(ValueError):
        TszCodec(lossy_resolution=0.0)


def test_unknown_format_and_flags_are_typed_errors() -> None:
    payload = TszCodec().encode(weather(3))
    with pytest.raises(DecodeError) as e:
        TszCodec().decode(b"\x09" + payload[1:], "d", Priority.LOW)
    assert e.value.reason == "bad_version"
    with pytest.raises(DecodeError) as e:
        TszCodec().decode(payload[:1] + b"\xf0" + payload[2:], "d", Priority.LOW)
    assert e.value.reason == "malformed"


def test_lossy_per_sensor_resolution_keeps_other_series_exact() -> None:
    codec = TszCodec(4, "tsz-lz4", entropy="lz4", lossy_resolution={"t": 0.5, "rh": 0.01})
    rs = []
    for i in range(300):
        rs.append(Reading("d", "t", i * 1000, 20 + math.sin(i / 7) * 3, seq=3 * i + 1))
        rs.append(Reading("d", "rh", i * 1000, 50 + math.cos(i / 9), seq=3 * i + 2))
        rs.append(Reading("d", "exact", i * 1000, math.pi * i, seq=3 * i + 3))
    chunk = seal_chunk(rs, codec)
    assert chunk_meta(chunk.payload).max_abs_err == 0.25
    out = open_chunk(chunk)
    for a, b in zip(rs, out):
        bound = {"t": 0.25, "rh": 0.005}.get(a.sensor, 0.0)
        assert abs(a.value - b.value) <= bound
        if a.sensor == "exact":
            assert bits(a.value) == bits(b.value)
        assert msgspec.structs.replace(a, value=0.0) == msgspec.structs.replace(b, value=0.0)
    with pytest.raises(ValueError):
        TszCodec(lossy_resolution={"t": -1.0})


@settings(max_examples=EXAMPLES, deadline=None)
@given(vals=st.lists(any_float, min_size=1, max_size=100),
       res=st.floats(min_value=1e-6, max_value=1e6))
def test_lossy_error_bound_holds_for_any_values(vals: list[float], res: float) -> None:
    rs = [Reading("d", "s", i, v, seq=i) for i, v in enumerate(vals)]
    out = open_chunk(seal_chunk(rs, TszCodec(lossy_resolution=res)))
    for a, b in zip(rs, out):
        if math.isfinite(a.value):
            assert abs(a.value - b.value) <= res / 2
        else:
            assert bits(a.value) == bits(b.value)
