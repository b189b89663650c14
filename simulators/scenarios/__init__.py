"""Named scenarios: ``pymigrate simulate NAME``. One module per scenario.

Each module defines ``NAME``, ``SUMMARY``, ``DEFAULTS`` and ``SHORT`` (``devices``,
``hours``: the full run and the short form the scenario tests use), ``async def
run(opts) -> Report`` and ``check(report) -> list[str]`` (the outcomes the requirements
demand; an empty list means every one holds).
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec

from simulators.report import Report

__all__ = ["NAMES", "Options", "base_checks", "get", "load"]

NAMES = ("weather-stations", "industrial-burst", "fleet-firmware", "cloud-outage",
         "cellular-cost", "storage-exhaustion", "clock-failures", "corrupt-buffer",
         "partition", "rate-limited")


class Options(msgspec.Struct, kw_only=True):
    """How to run a scenario (``None``: the scenario's default)."""

    devices: int | None = None
    hours: float | None = None
    seed: int = 1
    root: Path | None = None
    memory: bool = False
    progress: Callable[[float], None] | None = None

    def resolved(self, defaults: dict[str, Any]) -> tuple[int, float]:
        return (self.devices if self.devices is not None else int(defaults["devices"]),
                self.hours if self.hours is not None else float(defaults["hours"]))


def load(name: str) -> ModuleType:
    """The scenario module for ``name`` (``KeyError`` if unknown)."""
    if name not in NAMES:
        raise KeyError(name)
    return importlib.import_module(f"simulators.scenarios.{name.replace('-', '_')}")


def get(name: str) -> tuple[Callable[[Options], Awaitable[Report]],
                            Callable[[Report], list[str]]]:
    mod = load(name)
    return mod.run, mod.check


def base_checks(rep: Report, *, delivered: bool = True) -> list[str]:
    """What every scenario must show: nothing lost outside documented eviction, exactly
    once in the store, critical data never evicted, and (``delivered``) a full drain."""
    bad: list[str] = []
    if rep.lost:
        bad.append(f"{rep.lost} accepted readings lost")
    if rep.unexplained_extra:
        bad.append(f"{rep.unexplained_extra} readings stored beyond what was accepted")
    if rep.duplicates_stored:
        bad.append(f"{rep.duplicates_stored} duplicate rows stored")
    if rep.evicted_by_priority.get("critical", 0):
        bad.append("critical readings were evicted")
    crit = rep.produced_by_priority.get("critical", 0)
    if delivered and rep.delivered_by_priority.get("critical", 0) != crit:
        bad.append(f"critical delivered {rep.delivered_by_priority.get('critical', 0)} "
                   f"of {crit}")
    if delivered and not rep.all_delivered:
        bad.append("backlog not fully delivered")
    if rep.produced and not rep.accepted:
        bad.append("nothing accepted")
    return bad
