"""Cost/battery profile, switchable at run time.

:class:`PowerState` is what the uploader consults: the link profile (``unmetered``,
``metered``, ``battery``) and the battery level. The agent updates it (``update()``), or
points it at a file (``power_file``) that a power daemon writes; the file is re-read
when the uploader wakes anyway and at most every ``power_check_s`` while it sleeps.
File format: JSON ``{"profile": "battery", "battery_pct": 17}`` or plain
``battery 17`` (profile, optional percent).
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import structlog

from agent.retry.config import PROFILES
from pymigrate.types import Priority

log = structlog.get_logger("agent.retry.power")


class PowerState:
    """The current profile and battery level; ``changed`` wakes waiters on updates."""

    def __init__(self, profile: str = "unmetered", battery_pct: float | None = None, *,
                 low_battery_pct: float = 20.0, path: str | Path | None = None) -> None:
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}")
        self.profile = profile
        self.battery_pct = battery_pct
        self.low_battery_pct = low_battery_pct
        self.path = Path(path) if path else None
        self._mtime: int | None = None
        self._changed = asyncio.Event()
        self.errors = 0

    def update(self, *, profile: str | None = None, battery_pct: float | None = None) -> None:
        """Set the profile and/or battery level; wakes a sleeping uploader if it matters."""
        if profile is not None and profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}")
        before = (self.profile, self.battery_pct)
        if profile is not None:
            self.profile = profile
        if battery_pct is not None:
            self.battery_pct = battery_pct
        if (self.profile, self.battery_pct) != before:
            log.info("retry.power_state", profile=self.profile, battery_pct=self.battery_pct)
            self._changed.set()

    async def wait_changed(self) -> None:
        """Return on the next :meth:`update` that changed something."""
        self._changed.clear()
        await self._changed.wait()

    @property
    def low_battery(self) -> bool:
        return self.battery_pct is not None and self.battery_pct < self.low_battery_pct

    @property
    def min_priority(self) -> Priority:
        """What may be sent now: CRITICAL only on low battery, everything otherwise."""
        return Priority.CRITICAL if self.low_battery else Priority.LOW

    def refresh(self) -> bool:
        """Re-read ``path`` if it changed on disk; returns True when the state changed."""
        if self.path is None:
            return False
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        if st.st_mtime_ns == self._mtime:
            return False
        self._mtime = st.st_mtime_ns
        before = (self.profile, self.battery_pct)
        try:
            profile, pct = parse_power_text(self.path.read_text(encoding="utf-8"))
            self.update(profile=profile, battery_pct=pct)
        except (OSError, ValueError) as exc:
            self.errors += 1
            log.warning("retry.power_file_unreadable", path=str(self.path), error=str(exc))
            return False
        return (self.profile, self.battery_pct) != before


def parse_power_text(text: str) -> tuple[str | None, float | None]:
    """``{"profile": ..., "battery_pct": ...}`` or ``"<profile> [<pct>]"``."""
    text = text.strip()
    if text.startswith("{"):
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("power file JSON must be an object")
        prof = data.get("profile")
        pct = data.get("battery_pct")
        return (str(prof) if prof is not None else None,
                float(pct) if pct is not None else None)
    parts = text.split()
    if not parts:
        raise ValueError("empty power file")
    prof = parts[0]
    if prof not in PROFILES:
        raise ValueError(f"unknown profile {prof!r}")
    return prof, (float(parts[1]) if len(parts) > 1 else None)
