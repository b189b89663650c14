"""Fleet coordinator: registry and groups, gated rollouts in waves, rollback, dry run.

Layers: :mod:`~cloud.fleet.engine` (synchronous, I/O-free rollout core),
:mod:`~cloud.fleet.core` (message routing and ownership), :mod:`~cloud.fleet.coordinator`
(asyncio service: channel, timers on the injected clock, group-committed store),
:mod:`~cloud.fleet.sim` (dry run), :mod:`~cloud.fleet.cli` (``pymigrate fleet``).
"""

from cloud.fleet.channel import CoordinatorChannel, MemoryJobBus
from cloud.fleet.coordinator import Coordinator
from cloud.fleet.core import FleetCore
from cloud.fleet.engine import Rollout, Wave
from cloud.fleet.metrics import FleetMetrics
from cloud.fleet.pacing import Pacer
from cloud.fleet.registry import ATTRS, DeviceRow, Group, HealthSummary, Registry, UnknownDevice
from cloud.fleet.sim import FleetModel, SimResult, Simulation, dry_run
from cloud.fleet.spec import Gate, Pacing, RolloutSpec, WavePlan, Window, parse_spec
from cloud.fleet.states import DeviceState, FleetError, InvalidTransition, NotOwner
from cloud.fleet.store import FleetStore, open_store

__all__ = [
    "ATTRS", "Coordinator", "CoordinatorChannel", "DeviceRow", "DeviceState", "FleetCore",
    "FleetError", "FleetMetrics", "FleetModel", "FleetStore", "Gate", "Group", "HealthSummary",
    "InvalidTransition", "MemoryJobBus", "NotOwner", "Pacer", "Pacing", "Registry", "Rollout",
    "RolloutSpec", "SimResult", "Simulation", "UnknownDevice", "Wave", "WavePlan", "Window",
    "dry_run", "open_store", "parse_spec",
]
