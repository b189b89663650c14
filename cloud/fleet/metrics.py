"""Prometheus metrics of the coordinator, on a dedicated CollectorRegistry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from cloud.fleet.states import DeviceState

_NAMES = [s.name.lower() for s in DeviceState]


class FleetMetrics:
    """Counters for transitions, notifications, rejected and refused documents; gauges for
    per-rollout state counts and fleet health (refreshed by :meth:`refresh`)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.transitions = Counter("pymigrate_fleet_transitions", "Device state transitions",
                                   ["to"], registry=r)
        self._to = [self.transitions.labels(n) for n in _NAMES]
        self.notifications = Counter("pymigrate_fleet_notifications",
                                     "Job notifications sent", ["op"], registry=r)
        self.rejected = Counter("pymigrate_fleet_documents_rejected",
                                "Malformed or unknown-version job documents", ["reason"],
                                registry=r)
        self.refused = Counter("pymigrate_fleet_documents_refused",
                               "Documents about jobs the device does not own", registry=r)
        self.invalid_transitions = Counter("pymigrate_fleet_invalid_transitions",
                                           "Rejected invalid transitions", registry=r)
        self.states = Gauge("pymigrate_fleet_rollout_devices", "Devices per rollout and state",
                            ["rollout", "state"], registry=r)
        self.device_refusals = Counter(
            "pymigrate_fleet_device_refusals",
            "Notifications devices refused as untrusted (unsigned, bad signature)", ["reason"],
            registry=r)
        self.progress = Gauge("pymigrate_fleet_rollout_progress",
                              "Mean device progress of a rollout (0..1)", ["rollout"],
                              registry=r)
        self.online = Gauge("pymigrate_fleet_online_devices", "Devices online", registry=r)
        self.backlog = Gauge("pymigrate_fleet_backlog_bytes", "Reported backlog", registry=r)

    def transition(self, dst: int) -> None:
        """Count one transition into ``dst``."""
        self._to[dst].inc()

    def set_states(self, rollout_id: str, counts: list[int]) -> None:
        """Publish per-state counts of a rollout."""
        for i, n in enumerate(counts):
            self.states.labels(rollout_id, _NAMES[i]).set(n)

    def set_progress(self, rollout_id: str, progress: float) -> None:
        """Publish the mean device progress of a rollout."""
        self.progress.labels(rollout_id).set(progress)

    def render(self) -> bytes:
        """Prometheus text exposition."""
        return generate_latest(self.registry)
