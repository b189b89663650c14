"""Replay a CSV dataset: first column a timestamp (ISO 8601, epoch seconds or epoch
milliseconds), every other column a numeric sensor; an empty cell is a missing reading.

Non-numeric cells and unparseable timestamps are rejected with a counted reason.
``speed=0`` replays as fast as the pipeline accepts (backpressure); ``speed=1`` real time.
At the end of the file the source finishes (the agent keeps running and uploading) unless
``loop = true`` starts it again; ``exit_when_done = true`` stops the agent gracefully
instead, once every such source is done and what they sent is drained.
"""

from __future__ import annotations

import codecs
import csv
import math
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from agent.config import ReplaySource
from agent.sources.base import Emit, SourceBatch
from pymigrate.clock import Clock
from pymigrate.errors import ConfigError
from pymigrate.types import Reading

_EPOCH_MS_THRESHOLD = 100_000_000_000  # numbers above this are milliseconds
_SNIFF_BYTES = 64 * 1024  # read_header checks this much of the file


def parse_timestamp(text: str) -> int:
    """ISO 8601 (``Z`` or offset; naive = UTC), epoch seconds or epoch ms -> int ms UTC."""
    s = text.strip()
    if not s:
        raise ValueError("empty timestamp")
    try:
        num = float(s)
    except ValueError:
        iso = s[:-1] + "+00:00" if s.endswith(("Z", "z")) else s
        dt = datetime.fromisoformat(iso)
        if dt.tzinfo is None:
            from datetime import UTC

            dt = dt.replace(tzinfo=UTC)
        return round(dt.timestamp() * 1000)
    if not math.isfinite(num):
        raise ValueError(f"non-finite timestamp {s!r}")
    return round(num if abs(num) >= _EPOCH_MS_THRESHOLD else num * 1000)


def _looks_like_data(row: list[str]) -> bool:
    """A first line whose cells are a timestamp and numbers is data, not a header."""
    try:
        parse_timestamp(row[0])
        for cell in row[1:]:
            if cell.strip():
                float(cell)
    except ValueError:
        return False
    return True


def read_header(path: str | Path, *, key: str = "sources.path") -> list[str]:
    """Check a replay CSV and return its sensor names (the header without column one).

    Every problem a person can fix in the file is a :class:`ConfigError` naming ``key``
    and the file: missing, a directory, not UTF-8 (binary), empty, one column (another
    separator), a first line that is data (no header), empty or repeated column names.
    """
    p = Path(path)
    where = f"{p} (relative to {Path.cwd()})" if not p.is_absolute() else str(p)
    if not p.exists():
        raise ConfigError(key, f"replay file not found: {where}")
    if not p.is_file():
        raise ConfigError(key, f"{where} is not a regular file")
    try:
        with p.open("rb") as fb:
            head = fb.read(_SNIFF_BYTES)
    except OSError as exc:
        raise ConfigError(key, f"cannot read {p}: {exc.strerror or exc}") from None
    if b"\0" in head:
        raise ConfigError(key, f"{p} is binary, not a CSV text file")
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < _SNIFF_BYTES)
    except UnicodeDecodeError as exc:
        line = head.count(b"\n", 0, exc.start) + 1
        raise ConfigError(key, f"{p}: line {line} is not UTF-8 text; save the CSV as "
                          "UTF-8") from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ConfigError(key, f"{p} is empty: it needs a header line "
                          "'timestamp,sensor_a,sensor_b' and data rows")
    header = next(csv.reader([lines[0]]))
    if len(header) < 2:
        sep = next((c for c in ";\t|" if c in lines[0]), "")
        hint = (f": its columns look separated by {sep!r}; use commas" if sep
                else ": it needs a timestamp column and at least one sensor column")
        raise ConfigError(key, f"{p} has one column{hint}")
    if _looks_like_data(header):
        raise ConfigError(key, f"{p}: the first line {lines[0][:80]!r} is data, not a "
                          "header; add a header line 'timestamp,sensor_a,sensor_b,...'")
    sensors = [h.strip() for h in header[1:]]
    for i, name in enumerate(sensors, start=2):
        if not name:
            raise ConfigError(key, f"{p}: column {i} of the header has no name")
    dup = sorted({n for n in sensors if sensors.count(n) > 1})
    if dup:
        raise ConfigError(key, f"{p}: repeated column names in the header: {', '.join(dup)}")
    return sensors


class CsvRows:
    """Iterates (ts_ms, [(sensor, value)], rejects) over a replay-format CSV.

    The file is checked when constructed (:func:`read_header`). A cell beyond the
    header's columns is counted (``extra_columns``), never silently dropped.
    """

    def __init__(self, path: str | Path, *, key: str = "sources.path") -> None:
        self.path = Path(path)
        self.key = key
        self.sensors = read_header(self.path, key=key)

    def __iter__(self) -> Iterator[tuple[int | None, list[tuple[str, float]],
                                         list[tuple[str, str]]]]:
        with self.path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            try:
                header = next(reader, None)
                while header is not None and not any(c.strip() for c in header):
                    header = next(reader, None)
            except UnicodeDecodeError:
                raise ConfigError(self.key, f"{self.path} is not UTF-8 text") from None
            if not header or len(header) < 2:
                raise ConfigError(self.key, f"{self.path}: needs a timestamp column "
                                  "and at least one sensor column")
            sensors = [h.strip() for h in header[1:]]
            width = len(header)
            lineno = 1
            while True:
                try:
                    row = next(reader, None)
                except UnicodeDecodeError:
                    raise ConfigError(self.key, f"{self.path}: line {lineno + 1} is not "
                                      "UTF-8 text") from None
                if row is None:
                    break
                lineno += 1
                if not row:
                    continue
                rejects: list[tuple[str, str]] = []
                try:
                    ts = parse_timestamp(row[0])
                except ValueError:
                    yield None, [], [("bad_timestamp", f"{self.path.name}:{lineno}")]
                    continue
                if len(row) > width and any(c.strip() for c in row[width:]):
                    rejects.append(("extra_columns", f"{self.path.name}:{lineno}: "
                                    f"{len(row)} cells, header has {width}"))
                vals: list[tuple[str, float]] = []
                for name, cell in zip(sensors, row[1:]):
                    cell = cell.strip()
                    if not cell:
                        continue  # missing reading, not an error
                    try:
                        vals.append((name, float(cell)))
                    except ValueError:
                        rejects.append(("non_numeric", f"{self.path.name}:{lineno}:{name}"))
                yield ts, vals, rejects


class CsvReplay:
    """Replays a CSV as a source, optionally time-shifted to now, paced, looped."""

    name = "replay"

    def __init__(self, cfg: ReplaySource, *, device_id: str, clock: Clock) -> None:
        self.cfg = cfg
        self.device_id = device_id
        self.clock = clock
        self.rows = CsvRows(cfg.path)
        self.done = False
        self.exit_when_done = cfg.exit_when_done  # the supervisor stops the agent at the end

    async def run(self, emit: Emit) -> None:
        loop_shift = 0
        while True:
            first_ts: int | None = None
            last_ts = 0
            step = 1000
            start_mono = self.clock.monotonic()
            shift = 0
            for ts, vals, rejects in self.rows:
                if ts is None:
                    await emit(SourceBatch([], rejects=rejects, local_clock=False))
                    continue
                if first_ts is None:
                    first_ts = ts
                    shift = (self.clock.time_ms() - ts) if self.cfg.shift_to_now else loop_shift
                if self.cfg.speed > 0:
                    await self.clock.sleep_until(start_mono + (ts - first_ts) / 1000.0
                                                 / self.cfg.speed)
                t = ts + shift
                if t > last_ts and last_ts:
                    step = t - last_ts
                last_ts = t
                await emit(SourceBatch(
                    [Reading(device_id=self.device_id, sensor=s, ts_ms=t, value=v)
                     for s, v in vals], rejects=rejects, local_clock=False))
            if not self.cfg.loop or first_ts is None:
                break
            loop_shift = last_ts + step - first_ts if not self.cfg.shift_to_now else 0
        self.done = True
