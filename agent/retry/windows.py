"""Connectivity windows: when the link may be used (a daily satellite slot, a cheap tariff).

Two spellings, both UTC:

* ``"02:00-02:30"``: a daily slot (may wrap midnight: ``"23:50-00:10"``).
* ``"*/15 * * * *"``: cron-like minute and hour fields (``*``, ``*/n``, ``a-b``, ``a,b``);
  day, month and weekday must be ``*``. Each match opens a window of ``duration_s``.

No windows means always open.
"""

from __future__ import annotations

import msgspec

from pymigrate.errors import ConfigError

DAY_MS = 86_400_000


class Slot(msgspec.Struct, frozen=True):
    """A daily slot: opens at ``start_ms`` after midnight UTC, lasts ``length_ms``."""

    start_ms: int
    length_ms: int


def _hhmm(text: str) -> int:
    h, _, m = text.strip().partition(":")
    hour, minute = int(h), int(m)
    if not (0 <= hour <= 23 and 0 <= minute <= 59) or not m:
        raise ValueError(text)
    return (hour * 60 + minute) * 60_000


def _field(text: str, lo: int, hi: int) -> list[int]:
    out: set[int] = set()
    for part in text.split(","):
        step = 1
        if "/" in part:
            part, s = part.split("/", 1)
            step = int(s)
            if step <= 0:
                raise ValueError(text)
        if part == "*":
            a, b = lo, hi
        elif "-" in part:
            x, y = part.split("-", 1)
            a, b = int(x), int(y)
        else:
            a = int(part)
            b = hi if step != 1 else a
        if not (lo <= a <= b <= hi):
            raise ValueError(text)
        out.update(range(a, b + 1, step))
    return sorted(out)


def parse_window(spec: str, duration_s: float) -> list[Slot]:
    """One window spec -> its daily slots. Raises ValueError on bad syntax."""
    spec = spec.strip()
    fields = spec.split()
    if len(fields) == 1 and "-" in spec:
        a, b = spec.split("-", 1)
        start, end = _hhmm(a), _hhmm(b)
        length = (end - start) % DAY_MS
        if length == 0:
            raise ValueError(spec)
        return [Slot(start, length)]
    if len(fields) == 5:
        if any(f != "*" for f in fields[2:]):
            raise ValueError(spec)
        minutes = _field(fields[0], 0, 59)
        hours = _field(fields[1], 0, 23)
        length = int(duration_s * 1000)
        return [Slot((h * 60 + m) * 60_000, length) for h in hours for m in minutes]
    raise ValueError(spec)


def parse_windows(specs: tuple[str, ...] | list[str], duration_s: float) -> Windows:
    """All specs -> :class:`Windows`; a bad spec is ``ConfigError("retry.windows[i]")``."""
    slots: list[Slot] = []
    for i, spec in enumerate(specs):
        try:
            slots.extend(parse_window(spec, duration_s))
        except ValueError:
            raise ConfigError(f"retry.windows[{i}]",
                              f"bad window {spec!r} (expected 'HH:MM-HH:MM' or "
                              "'M H * * *' cron minute/hour fields)") from None
    return Windows(slots)


class Windows:
    """Answers "is the link usable now?" and "when does it open / close next?"."""

    def __init__(self, slots: list[Slot]) -> None:
        self.slots = sorted(slots, key=lambda s: s.start_ms)

    @property
    def always_open(self) -> bool:
        return not self.slots

    def _intervals(self, now_ms: int) -> list[tuple[int, int]]:
        day0 = now_ms - now_ms % DAY_MS
        return [(day0 + d * DAY_MS + s.start_ms, day0 + d * DAY_MS + s.start_ms + s.length_ms)
                for d in (-1, 0, 1) for s in self.slots]

    def is_open(self, now_ms: int) -> bool:
        return self.always_open or any(a <= now_ms < b for a, b in self._intervals(now_ms))

    def next_open_ms(self, now_ms: int) -> int:
        """``now_ms`` when open, else the wall time (ms UTC) the next window opens."""
        if self.is_open(now_ms):
            return now_ms
        return min(a for a, _ in self._intervals(now_ms) if a > now_ms)

    def close_ms(self, now_ms: int) -> int | None:
        """When the currently open window closes (None: always open or closed now)."""
        if self.always_open:
            return None
        ends = [b for a, b in self._intervals(now_ms) if a <= now_ms < b]
        return max(ends) if ends else None
