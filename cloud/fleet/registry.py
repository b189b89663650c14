"""Device registry: attributes, last-seen health, static and dynamic groups.

Compact on purpose (the coordinator must stay under 1 KB per device at 100,000
devices): a device is an index into parallel arrays; its attribute tuple is interned,
so devices sharing region/hardware/firmware/connectivity/site share one tuple.
Fleet-wide aggregates (online count, backlog sum) are maintained incrementally:
reporting health costs O(1), asking for fleet health costs O(1).
"""

from __future__ import annotations

import fnmatch
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import msgspec

from cloud.fleet.protocol import Health
from cloud.fleet.states import FleetError

ATTRS = ("region", "hardware", "firmware", "connectivity", "site")


class UnknownDevice(FleetError):
    """The device id is not registered."""

    reason = "unknown_device"


class UnknownGroup(FleetError):
    """No group with that name."""

    reason = "unknown_group"


class DeviceRow(msgspec.Struct, frozen=True):
    """One device as persisted/exported."""

    device_id: str
    attrs: dict[str, str]
    online: bool = True
    backlog_bytes: int = 0
    lag_s: float = 0.0
    error_rate: float = 0.0
    last_seen_ms: int = 0


class Group(msgspec.Struct, frozen=True):
    """A static group (``members``) or a dynamic one (``selector``: attribute -> pattern
    or list of patterns; fnmatch wildcards allowed; all attributes must match)."""

    name: str
    members: tuple[str, ...] = ()
    selector: dict[str, str | list[str]] | None = None

    @property
    def dynamic(self) -> bool:
        """True for a selector-based group."""
        return self.selector is not None


def _matches(value: str, pattern: str | list[str]) -> bool:
    pats = [pattern] if isinstance(pattern, str) else pattern
    return any(fnmatch.fnmatchcase(value, p) for p in pats)


class HealthSummary(msgspec.Struct, frozen=True):
    """Fleet health at a glance."""

    devices: int
    online: int
    online_pct: float
    backlog_bytes: int
    mean_lag_s: float
    mean_error_rate: float


class Registry:
    """Devices, their attributes and last-seen health, and groups."""

    def __init__(self) -> None:
        self._index: dict[str, int] = {}
        self.ids: list[str] = []
        self._attrs: list[tuple[str, ...]] = []
        self._intern: dict[tuple[str, ...], tuple[str, ...]] = {}
        self.online = bytearray()
        self.backlog = array("q")
        self.lag = array("f")
        self.err = array("f")
        self.last_seen_ms = array("q")
        self._online_n = 0
        self._backlog_sum = 0
        self._lag_sum = 0.0
        self._err_sum = 0.0
        self.groups: dict[str, Group] = {}
        #: called with the device index when a device goes offline -> online
        self.on_online: list[Callable[[int], None]] = []

    def __len__(self) -> int:
        return len(self.ids)

    # -- devices --------------------------------------------------------------------
    def add(self, device_id: str, attrs: Mapping[str, str] | None = None, *,
            online: bool = True) -> int:
        """Register (or update the attributes of) a device; returns its index."""
        key = tuple(str((attrs or {}).get(a, "")) for a in ATTRS)
        tup = self._intern.setdefault(key, key)
        idx = self._index.get(device_id)
        if idx is not None:
            self._attrs[idx] = tup
            return idx
        idx = len(self.ids)
        self._index[device_id] = idx
        self.ids.append(device_id)
        self._attrs.append(tup)
        self.online.append(1 if online else 0)
        self._online_n += 1 if online else 0
        self.backlog.append(0)
        self.lag.append(0.0)
        self.err.append(0.0)
        self.last_seen_ms.append(0)
        return idx

    def index(self, device_id: str) -> int:
        """Index of a registered device; raises :class:`UnknownDevice`."""
        try:
            return self._index[device_id]
        except KeyError:
            raise UnknownDevice(f"unknown device {device_id!r}", device_id=device_id) from None

    def get_index(self, device_id: str) -> int | None:
        """Index of a device or None."""
        return self._index.get(device_id)

    def attrs(self, idx: int) -> dict[str, str]:
        """Attributes of device ``idx``."""
        return dict(zip(ATTRS, self._attrs[idx]))

    def set_online(self, idx: int, online: bool) -> None:
        """Mark a device online/offline (from a report, a will message or a pull)."""
        was = self.online[idx]
        now = 1 if online else 0
        if was == now:
            return
        self.online[idx] = now
        self._online_n += now - was
        if now:
            for cb in self.on_online:
                cb(idx)

    def report(self, idx: int, health: Health, now_ms: int) -> None:
        """Record a health report (O(1), keeps fleet aggregates current)."""
        self._backlog_sum += health.backlog_bytes - self.backlog[idx]
        self._lag_sum += health.lag_s - self.lag[idx]
        self._err_sum += health.error_rate - self.err[idx]
        self.backlog[idx] = health.backlog_bytes
        self.lag[idx] = health.lag_s
        self.err[idx] = health.error_rate
        self.last_seen_ms[idx] = now_ms
        self.set_online(idx, health.online)

    def row(self, idx: int) -> DeviceRow:
        """Exportable row of device ``idx``."""
        return DeviceRow(self.ids[idx], self.attrs(idx), bool(self.online[idx]),
                         int(self.backlog[idx]), float(self.lag[idx]), float(self.err[idx]),
                         int(self.last_seen_ms[idx]))

    def rows(self) -> Iterator[DeviceRow]:
        """Every device as a row."""
        for i in range(len(self.ids)):
            yield self.row(i)

    def load_rows(self, rows: Iterable[DeviceRow]) -> None:
        """Restore devices (e.g. from the state store)."""
        for r in rows:
            idx = self.add(r.device_id, r.attrs, online=r.online)
            self.set_online(idx, r.online)
            self.report(idx, Health(backlog_bytes=r.backlog_bytes, lag_s=r.lag_s,
                                    error_rate=r.error_rate), r.last_seen_ms)
            self.set_online(idx, r.online)

    # -- groups ---------------------------------------------------------------------
    def add_group(self, group: Group) -> None:
        """Create or replace a group."""
        self.groups[group.name] = group

    def resolve(self, name: str) -> list[int]:
        """Device indices of a group, in registration order (O(N), at rollout creation)."""
        group = self.groups.get(name)
        if group is None:
            if name == "all":
                return list(range(len(self.ids)))
            raise UnknownGroup(f"unknown group {name!r}", group=name)
        if group.selector is None:
            return sorted(self._index[m] for m in set(group.members) if m in self._index)
        sel = [(ATTRS.index(k), v) for k, v in group.selector.items() if k in ATTRS]
        unknown = [k for k in group.selector if k not in ATTRS]
        if unknown:
            raise UnknownGroup(f"selector of {name!r} uses unknown attributes {unknown}",
                               group=name)
        cache: dict[tuple[str, ...], bool] = {}
        out: list[int] = []
        for i, tup in enumerate(self._attrs):
            ok = cache.get(tup)
            if ok is None:
                ok = cache[tup] = all(_matches(tup[a], p) for a, p in sel)
            if ok:
                out.append(i)
        return out

    # -- health ---------------------------------------------------------------------
    def summary(self) -> HealthSummary:
        """Fleet health, O(1)."""
        n = len(self.ids)
        return HealthSummary(
            devices=n, online=self._online_n,
            online_pct=round(100.0 * self._online_n / n, 2) if n else 0.0,
            backlog_bytes=self._backlog_sum,
            mean_lag_s=round(self._lag_sum / n, 3) if n else 0.0,
            mean_error_rate=round(self._err_sum / n, 5) if n else 0.0)

    def mean_backlog(self) -> float:
        """Mean reported backlog per device, bytes (O(1))."""
        return self._backlog_sum / len(self.ids) if self.ids else 0.0

    def export(self) -> dict[str, Any]:
        """Summary as a plain dict (for status output)."""
        return msgspec.to_builtins(self.summary())  # type: ignore[no-any-return]
