"""InfluxDB line protocol export.

Readings of one device taken at the same instant become one line (what Telegraf sends):
``measurement,device=<id> <sensor>=<value>,... <timestamp>``. An aggregate reading's
field is named ``<sensor>_<fn>``. NaN and +-inf cannot be written in line protocol, so
they are skipped (a line left without fields is dropped).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from pymigrate.types import Reading

__all__ = ["PRECISIONS", "escape_key", "escape_measurement", "to_line_protocol"]

PRECISIONS = {"ns": 1_000_000, "us": 1_000, "ms": 1}

_MEAS = str.maketrans({",": "\\,", " ": "\\ ", "\n": "\\n", "\\": "\\\\"})
_KEY = str.maketrans({",": "\\,", "=": "\\=", " ": "\\ ", "\n": "\\n", "\\": "\\\\"})


def escape_measurement(name: str) -> str:
    """Escape a measurement name (commas, spaces, newlines, backslashes)."""
    return name.translate(_MEAS)


def escape_key(name: str) -> str:
    """Escape a tag key, tag value or field key (commas, equals signs, spaces)."""
    return name.translate(_KEY)


def to_line_protocol(readings: Iterable[Reading], measurement: str = "readings", *,
                     precision: str = "ns") -> str:
    """Render readings as line protocol (one line per device and instant, ``\\n``-ended).

    ``precision`` is "ns" (InfluxDB's default), "us" or "ms"; the write request must
    name the same precision.
    """
    try:
        mult = PRECISIONS[precision]
    except KeyError:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}") from None
    meas = escape_measurement(measurement)
    lines: list[str] = []
    cur_key: tuple[str, int] | None = None
    fields: dict[str, str] = {}

    def flush() -> None:
        if cur_key is not None and fields:
            body = ",".join(f"{k}={v}" for k, v in fields.items())
            lines.append(f"{meas},device={escape_key(cur_key[0])} {body} {cur_key[1] * mult}")

    for r in readings:
        value = float(r.value)
        if not math.isfinite(value):
            continue
        name = f"{r.sensor}_{r.agg.fn}" if r.agg is not None else r.sensor
        fkey = escape_key(name)
        key = (r.device_id, r.ts_ms)
        if key != cur_key or fkey in fields:
            flush()
            cur_key = key
            fields = {}
        fields[fkey] = repr(value)
    flush()
    return "".join(line + "\n" for line in lines)
