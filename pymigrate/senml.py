"""SenML (RFC 8428) packs in JSON and CBOR: parse into Readings, export Readings.

Parsing resolves base fields the way RFC 8428 section 4.6 says: ``bn``/``bt``/``bu``/
``bv``/``bs``/``bver`` apply to the record that carries them and every later record
until changed; name = ``bn + n``; time = ``bt + t`` in seconds, where a resolved time
below 2**28 is relative to ``now_ms``; value = ``bv + v``. ``vb`` becomes 1.0 / 0.0.
A pack with any malformed record is rejected whole (no partial writes) with a
:class:`DecodeError` whose ``reason`` names the problem and whose ``index`` is the record.
Units are checked but not kept: a Reading has no unit field. String and data values
(``vs``, ``vd``) and sum-only records are refused (``reason="non_numeric"``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import cbor2
import msgspec

from pymigrate.errors import DecodeError
from pymigrate.types import Priority, Reading

__all__ = ["MAX_PACK_BYTES", "MAX_RECORDS", "parse_senml", "to_senml_cbor", "to_senml_json"]

MAX_PACK_BYTES = 4 * 1024 * 1024
MAX_RECORDS = 100_000
RELATIVE_LIMIT_S = 2**28  # RFC 8428 4.5.3: smaller times are relative to now
SENML_VERSION = 10
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-:./_]*\Z")
# RFC 8428 table 6: CBOR integer labels
_LABELS = {-1: "bver", -2: "bn", -3: "bt", -4: "bu", -5: "bv", -6: "bs", 0: "n", 1: "u",
           2: "v", 3: "vs", 4: "vb", 5: "s", 6: "t", 7: "ut", 8: "vd"}
_LABEL_OF = {v: k for k, v in _LABELS.items()}
_KNOWN = frozenset(_LABELS.values())
_STR_FIELDS = ("bn", "bu", "n", "u", "vs", "vd")
_NUM_FIELDS = ("bt", "bv", "bs", "v", "s", "t", "ut")
_I64 = 2**63


def _fail(reason: str, message: str, index: int) -> DecodeError:
    return DecodeError(f"SenML record {index}: {message}", reason=reason, index=index)


def _load(data: bytes, content_format: str) -> Any:
    if len(data) > MAX_PACK_BYTES:
        raise DecodeError(f"SenML pack of {len(data)} bytes exceeds {MAX_PACK_BYTES}",
                          reason="oversized")
    try:
        if content_format == "json":
            return msgspec.json.decode(data)
        if content_format == "cbor":
            return cbor2.loads(data)
    except (msgspec.DecodeError, cbor2.CBORDecodeError, ValueError, TypeError, KeyError,
            OverflowError, RecursionError, MemoryError, EOFError) as exc:
        raise DecodeError(f"malformed SenML {content_format}: {exc}",
                          reason="malformed") from exc
    raise ValueError(f"content_format must be 'json' or 'cbor', not {content_format!r}")


def _fields(rec: Any, index: int) -> dict[str, Any]:
    if not isinstance(rec, Mapping):
        raise _fail("not_a_record", "record is not a map", index)
    out: dict[str, Any] = {}
    for key, value in rec.items():
        if isinstance(key, int) and not isinstance(key, bool):
            name = _LABELS.get(key)
            if name is None:
                continue  # unknown integer label: an ignorable extension
        elif isinstance(key, str):
            name = key
        else:
            raise _fail("bad_label", f"label {key!r} is neither text nor integer", index)
        if name not in _KNOWN:
            if name.endswith("_"):
                raise _fail("must_understand", f"unsupported mandatory field {name!r}", index)
            continue
        if name in out:
            raise _fail("duplicate_field", f"field {name!r} appears twice", index)
        out[name] = value
    for name in _STR_FIELDS:
        if name in out and not isinstance(out[name], str):
            raise _fail("bad_type", f"{name} must be a string", index)
    for name in _NUM_FIELDS:
        if name in out:
            v = out[name]
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise _fail("bad_type", f"{name} must be a number", index)
            if isinstance(v, int):
                if not -_I64 <= v < _I64:
                    raise _fail("bad_number", f"{name} is out of range", index)
            elif not math.isfinite(v) and name != "v":
                raise _fail("bad_number", f"{name} must be finite", index)
    if "vb" in out and not isinstance(out["vb"], bool):
        raise _fail("bad_type", "vb must be a boolean", index)
    if "bver" in out:
        ver = out["bver"]
        if isinstance(ver, bool) or not isinstance(ver, int):
            raise _fail("bad_type", "bver must be an integer", index)
        if ver > SENML_VERSION:
            raise _fail("unsupported_version", f"SenML version {ver} is newer than 10", index)
    return out


def parse_senml(data: bytes, *, content_format: str, device_id: str, now_ms: int,
                priority: Priority = Priority.NORMAL) -> list[Reading]:
    """Parse a SenML pack (``content_format`` "json" or "cbor") into Readings of
    ``device_id``; relative times resolve against ``now_ms``. Raises DecodeError."""
    pack = _load(bytes(data), content_format)
    if not isinstance(pack, list):
        raise DecodeError("SenML pack is not an array", reason="not_a_pack")
    if len(pack) > MAX_RECORDS:
        raise DecodeError(f"SenML pack has more than {MAX_RECORDS} records",
                          reason="oversized")
    bn, bt, bv = "", 0.0, 0.0
    out: list[Reading] = []
    for i, rec in enumerate(pack):
        f = _fields(rec, i)
        bn = f.get("bn", bn)
        bt = f.get("bt", bt)
        bv = f.get("bv", bv)
        name = bn + f.get("n", "")
        if not _NAME.match(name):
            raise _fail("bad_name", f"name {name!r} is empty or has characters SenML forbids",
                        i)
        kinds = [k for k in ("v", "vs", "vb", "vd") if k in f]
        if len(kinds) > 1:
            raise _fail("multiple_values", f"record has several values: {kinds}", i)
        if not kinds or kinds[0] in ("vs", "vd"):
            raise _fail("non_numeric", "record has no numeric or boolean value", i)
        try:
            value = (1.0 if f["vb"] else 0.0) if kinds[0] == "vb" else float(bv + f["v"])
            t = bt + f.get("t", 0)
            t_ms = t * 1000.0 + (now_ms if t < RELATIVE_LIMIT_S else 0)
        except OverflowError as exc:
            raise _fail("bad_number", "number out of range", i) from exc
        if not math.isfinite(t_ms) or not -_I64 <= t_ms < _I64:
            raise _fail("bad_time", "time out of range", i)
        out.append(Reading(device_id, name, round(t_ms), value, priority))
    return out


def _records(readings: Iterable[Reading], base_name: str, cbor: bool) -> list[dict[Any, Any]]:
    out: list[dict[Any, Any]] = []
    rs = list(readings)
    if not rs:
        return out
    bt_ms = rs[0].ts_ms
    for i, r in enumerate(rs):
        if not cbor and not math.isfinite(r.value):
            continue  # JSON cannot carry NaN or infinities
        rec: dict[str, Any] = {}
        if not out:
            if base_name:
                rec["bn"] = base_name
            rec["bt"] = bt_ms / 1000
        rec["n"] = r.sensor
        if r.ts_ms != bt_ms or i == 0:
            dt = (r.ts_ms - bt_ms) / 1000
            if dt:
                rec["t"] = dt
        rec["v"] = r.value
        out.append({_LABEL_OF[k]: v for k, v in rec.items()} if cbor else rec)
    return out


def to_senml_json(readings: Iterable[Reading], *, base_name: str = "") -> bytes:
    """Export readings as a SenML JSON pack (times in seconds: base time + offsets).

    Non-finite values are left out (JSON has no NaN); use CBOR to keep them.
    """
    return msgspec.json.encode(_records(readings, base_name, cbor=False))


def to_senml_cbor(readings: Iterable[Reading], *, base_name: str = "") -> bytes:
    """Export readings as a SenML CBOR pack (RFC 8428 integer labels)."""
    return bytes(cbor2.dumps(_records(readings, base_name, cbor=True)))
