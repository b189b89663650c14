"""SenML (RFC 8428) parsing and export; InfluxDB line protocol export."""

from __future__ import annotations

import json
import math

import cbor2
import pytest

from pymigrate.errors import DecodeError
from pymigrate.lineproto import escape_key, escape_measurement, to_line_protocol
from pymigrate.senml import parse_senml, to_senml_cbor, to_senml_json
from pymigrate.types import AggInfo, Priority, Reading

NOW_MS = 1_700_000_000_000


def parse_json(doc: object, **kw: object) -> list[Reading]:
    return parse_senml(json.dumps(doc).encode(), content_format="json", device_id="gw1",
                       now_ms=NOW_MS, **kw)  # type: ignore[arg-type]


def test_rfc8428_multiple_datapoints_example() -> None:
    # RFC 8428 section 5.1.2 (times relative to a base time, base name, base unit)
    pack = [
        {"bn": "urn:dev:ow:10e2073a01080063:", "bt": 1.320067464e+09, "bu": "%RH", "v": 20},
        {"u": "lon", "v": 24.30621},
        {"u": "lat", "v": 60.07965},
        {"t": 60, "v": 20.3},
        {"u": "lon", "t": 60, "v": 24.30622},
        {"u": "lat", "t": 60, "v": 60.07965},
        {"t": 120, "v": 20.7},
    ]
    rs = parse_json(pack)
    assert [r.ts_ms for r in rs] == [1_320_067_464_000] * 3 + [1_320_067_524_000] * 3 + [
        1_320_067_584_000]
    assert {r.sensor for r in rs} == {"urn:dev:ow:10e2073a01080063:"}
    assert [r.value for r in rs][:4] == [20.0, 24.30621, 60.07965, 20.3]
    assert all(r.device_id == "gw1" and r.priority is Priority.NORMAL for r in rs)


def test_base_value_boolean_and_relative_time() -> None:
    pack = [{"bn": "room1/", "bv": 10, "n": "temp", "v": 1.5},
            {"n": "door", "vb": True, "t": -5},
            {"n": "temp", "v": -2}]
    rs = parse_json(pack, priority=Priority.HIGH)
    assert [(r.sensor, r.value) for r in rs] == [("room1/temp", 11.5), ("room1/door", 1.0),
                                                 ("room1/temp", 8.0)]
    # no base time: times are relative to now (RFC 8428 4.5.3)
    assert rs[0].ts_ms == NOW_MS and rs[1].ts_ms == NOW_MS - 5000
    assert rs[1].priority is Priority.HIGH


def test_cbor_integer_labels() -> None:
    pack = [{-2: "dev:", -3: 1_600_000_000, 0: "t", 2: 21.25, 6: 1.5}, {0: "h", 4: False}]
    rs = parse_senml(cbor2.dumps(pack), content_format="cbor", device_id="d", now_ms=0)
    assert [(r.sensor, r.ts_ms, r.value) for r in rs] == [
        ("dev:t", 1_600_000_001_500, 21.25), ("dev:h", 1_600_000_000_000, 0.0)]


def test_unknown_fields_ignored_but_mandatory_ones_rejected() -> None:
    assert parse_json([{"n": "a", "v": 1, "foo": 3}])[0].value == 1.0
    with pytest.raises(DecodeError) as e:
        parse_json([{"n": "a", "v": 1, "foo_": 3}])
    assert e.value.reason == "must_understand"


@pytest.mark.parametrize(("pack", "reason"), [
    ({"n": "a", "v": 1}, "not_a_pack"),
    ([1], "not_a_record"),
    ([{"v": 1}], "bad_name"),
    ([{"n": "-bad", "v": 1}], "bad_name"),
    ([{"n": "a b", "v": 1}], "bad_name"),
    ([{"n": "a"}], "non_numeric"),
    ([{"n": "a", "vs": "text"}], "non_numeric"),
    ([{"n": "a", "vd": "AAEC"}], "non_numeric"),
    ([{"n": "a", "v": 1, "vb": True}], "multiple_values"),
    ([{"n": "a", "v": "1"}], "bad_type"),
    ([{"n": "a", "v": True}], "bad_type"),
    ([{"n": "a", "vb": 1}], "bad_type"),
    ([{"n": 5, "v": 1}], "bad_type"),
    ([{"n": "a", "v": 1, "bver": 11}], "unsupported_version"),
    ([{"n": "a", "v": 1, "bver": "x"}], "bad_type"),
    ([{"n": "a", "v": 1, "t": 1e300}], "bad_time"),
])
def test_malformed_records_rejected_with_reason(pack: object, reason: str) -> None:
    with pytest.raises(DecodeError) as e:
        parse_json(pack)
    assert e.value.reason == reason


def test_malformed_cbor_records() -> None:
    with pytest.raises(DecodeError) as e:
        parse_senml(cbor2.dumps([{b"x": 1}]), content_format="cbor", device_id="d", now_ms=0)
    assert e.value.reason == "bad_label"
    with pytest.raises(DecodeError) as e:
        parse_senml(cbor2.dumps([{0: "a", 2: 1, "n": "b"}]), content_format="cbor",
                    device_id="d", now_ms=0)
    assert e.value.reason == "duplicate_field"
    with pytest.raises(DecodeError) as e:
        parse_senml(cbor2.dumps([{0: "a", 2: 1, 6: 10**400}]), content_format="cbor",
                    device_id="d", now_ms=0)
    assert e.value.reason in {"bad_number", "bad_time"}
    with pytest.raises(DecodeError) as e:
        parse_senml(cbor2.dumps([{0: "a", 2: 1, 6: math.inf}]), content_format="cbor",
                    device_id="d", now_ms=0)
    assert e.value.reason == "bad_number"


def test_size_limits_and_format_name() -> None:
    with pytest.raises(DecodeError) as e:
        parse_senml(b"[" + b" " * (5 * 1024 * 1024) + b"]", content_format="json",
                    device_id="d", now_ms=0)
    assert e.value.reason == "oversized"
    with pytest.raises(ValueError):
        parse_senml(b"[]", content_format="xml", device_id="d", now_ms=0)
    assert parse_senml(b"[]", content_format="json", device_id="d", now_ms=0) == []


def readings() -> list[Reading]:
    return [Reading("d", "temp", 1_700_000_000_000 + 250 * i, 20 + i / 4, seq=i)
            for i in range(8)] + [Reading("d", "hum", 1_700_000_001_000, 55.5)]


@pytest.mark.parametrize("fmt", ["json", "cbor"])
def test_export_roundtrips_through_parse(fmt: str) -> None:
    rs = readings()
    data = to_senml_json(rs) if fmt == "json" else to_senml_cbor(rs)
    back = parse_senml(data, content_format=fmt, device_id="d", now_ms=0)
    assert [(r.sensor, r.ts_ms, r.value) for r in back] == [
        (r.sensor, r.ts_ms, r.value) for r in rs]
    named = to_senml_json(rs, base_name="gw:") if fmt == "json" else to_senml_cbor(
        rs, base_name="gw:")
    assert parse_senml(named, content_format=fmt, device_id="d", now_ms=0)[0].sensor == "gw:temp"


def test_export_non_finite_values() -> None:
    rs = [Reading("d", "a", 1_700_000_000_000, math.nan), Reading("d", "a", 1_700_000_000_000,
                                                                  1.0)]
    assert len(json.loads(to_senml_json(rs))) == 1
    back = parse_senml(to_senml_cbor(rs), content_format="cbor", device_id="d", now_ms=0)
    assert math.isnan(back[0].value) and back[1].value == 1.0
    assert to_senml_json([]) == b"[]"


def test_line_protocol_groups_fields_and_escapes() -> None:
    rs = [Reading("gw 1,a", "t=1", 1000, 20.5), Reading("gw 1,a", "rh", 1000, 40.0),
          Reading("gw 1,a", "t=1", 1000, 21.0),  # same field again: new line
          Reading("gw 1,a", "t=1", 2000, math.inf),  # skipped
          Reading("gw 1,a", "x", 3000, 1e20, agg=AggInfo("r", "max", 3000, 2))]
    text = to_line_protocol(rs, "my meas")
    assert text.splitlines() == [
        "my\\ meas,device=gw\\ 1\\,a t\\=1=20.5,rh=40.0 1000000000",
        "my\\ meas,device=gw\\ 1\\,a t\\=1=21.0 1000000000",
        "my\\ meas,device=gw\\ 1\\,a x_max=1e+20 3000000000",
    ]
    one = to_line_protocol(rs[:1], precision="ms")
    assert one == "readings,device=gw\\ 1\\,a t\\=1=20.5 1000\n"
    with pytest.raises(ValueError):
        to_line_protocol(rs, precision="s")
    assert escape_measurement("a,b c") == "a\\,b\\ c"
    assert escape_key("k=v") == "k\\=v"
