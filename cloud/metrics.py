"""Prometheus metrics and health for the cloud ingest and the fleet coordinator.

Like the agent's, these read counters that already exist (``IngestService.counters``,
the coordinator's :class:`~cloud.fleet.FleetMetrics` registry and ``status()``) at
scrape time: nothing is counted twice. Each service gets a dedicated registry and the
same small asyncio HTTP endpoint as the agent (``/metrics``, ``/health``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from agent.metrics import HttpEndpoint, json_route, metrics_route

if TYPE_CHECKING:
    from cloud.app import CloudApp
    from cloud.fleet.coordinator import Coordinator
    from cloud.ingest import IngestService

__all__ = ["IngestCollector", "cloud_endpoint", "cloud_health", "cloud_registry",
           "coordinator_endpoint", "coordinator_health"]

P = "pymigrate_cloud_"
# IngestService.counters key -> (metric, help); keys not listed land in ``events_total``
_PLAIN = {
    "batches_received": ("batches_received", "Batches received by any listener"),
    "throttled": ("batches_throttled", "Batches answered with a throttle"),
    "store_errors": ("store_errors", "Batches not acked because the store failed"),
    "readings_written": ("readings_written", "Readings written to the store"),
    "readings_duplicate": ("readings_duplicate", "Re-sent readings dropped idempotently"),
    "gateway_dropped": ("gateway_dropped", "Readings dropped by cross-gateway dedup"),
    "gateway_replaced": ("gateway_replaced", "Readings replaced by cross-gateway dedup"),
    "dead_letters": ("dead_letters", "Payloads dead-lettered"),
    "dead_letter_errors": ("dead_letter_errors", "Dead-letter writes that failed"),
    "readings_conflict": ("readings_conflict", "Readings kept apart: same seqs, other content"),
    "gaps_received": ("gaps_received", "Gap records received from agents"),
}


class IngestCollector(Collector):
    """Exposes one :class:`IngestService`'s counters."""

    def __init__(self, service: IngestService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        c = dict(self.service.counters)
        for key, (name, doc) in _PLAIN.items():
            yield CounterMetricFamily(P + name, doc, value=c.pop(key, 0))
        status = CounterMetricFamily(P + "batches_acked", "Batches acked, by ack status",
                                     labels=["status"])
        rejected = CounterMetricFamily(P + "batches_rejected", "Batches rejected, by reason",
                                       labels=["reason"])
        other = CounterMetricFamily(P + "events", "Other ingest counters", labels=["event"])
        for key, n in sorted(c.items()):
            if key.startswith("rejected:"):
                rejected.add_metric([key.partition(":")[2]], n)
            elif key.startswith("batches_"):
                status.add_metric([key.removeprefix("batches_")], n)
            else:
                other.add_metric([key], n)
        yield status
        yield rejected
        yield other


class CompletenessCollector(Collector):
    """The last completeness accounting of a :class:`CloudApp` (every
    ``cloud.completeness_interval_s``): per device, readings unexplained, in gaps by
    reason, in conflict, and the highest sequence number seen."""

    def __init__(self, app: CloudApp) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        docs = {
            "unexplained": "Sequence numbers neither stored nor named by a gap record",
            "stored": "Sequence numbers stored",
            "conflicts": "Readings whose sequence numbers arrived again with other content",
            "max_seq": "Highest sequence number issued, as the agents report it",
            "ranges_forgotten": "Idempotency ranges dropped for size (a resend of them is "
                                "caught by the store's key, not the state)",
            "state_ranges": "Exception ranges the idempotency state holds (its size)",
        }
        fams = {k: GaugeMetricFamily(P + f"completeness_{k}", v, labels=["device"])
                for k, v in docs.items()}
        gaps = GaugeMetricFamily(P + "completeness_gaps", "Sequence numbers accounted for "
                                 "by gap records, by reason", labels=["device", "reason"])
        for dev, s in sorted(self.app.completeness.items()):
            for k, fam in fams.items():
                fam.add_metric([dev], s[k])
            for reason, n in sorted(s["gaps"].items()):
                gaps.add_metric([dev, reason], n)
        yield from fams.values()
        yield gaps
        yield GaugeMetricFamily(P + "completeness_accounted_at_seconds",
                                "When the completeness was last accounted (epoch s, 0 never)",
                                value=self.app.completeness_at_ms / 1000.0)


def cloud_registry(service: IngestService, *, process: bool = True,
                   app: CloudApp | None = None) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(IngestCollector(service))
    if app is not None:
        reg.register(CompletenessCollector(app))
    if process:
        ProcessCollector(namespace="pymigrate_cloud", registry=reg)
    return reg


def cloud_health(app: CloudApp) -> dict[str, Any]:
    """Healthy once the store is open and every listener started."""
    ready = app.ready.is_set()
    return {"healthy": ready, "status": "ok" if ready else "starting",
            "store": app.store.name, "listeners": [s.name for s in app.servers],
            "counters": dict(app.service.counters)}


def cloud_endpoint(app: CloudApp, host: str = "127.0.0.1", port: int = 9109) -> HttpEndpoint:
    """``/metrics`` + ``/health`` for a cloud ingest process."""
    reg = cloud_registry(app.service, app=app)
    return HttpEndpoint({"/metrics": metrics_route(reg),
                         "/health": json_route(lambda: cloud_health(app))}, host, port,
                        name="cloud metrics")


def coordinator_health(coordinator: Coordinator) -> dict[str, Any]:
    st = coordinator.status()
    return {"healthy": True, "status": "ok", "fleet": st["fleet"],
            "rollouts": len(st["rollouts"])}


def coordinator_endpoint(coordinator: Coordinator, host: str = "127.0.0.1",
                         port: int = 9110) -> HttpEndpoint:
    """``/metrics`` (the coordinator's FleetMetrics registry) + ``/health``."""
    render = metrics_route(coordinator.metrics.registry)

    def scrape() -> tuple[int, str, bytes]:
        coordinator.status()  # refreshes the online/backlog/per-rollout gauges first
        return render()

    return HttpEndpoint({"/metrics": scrape,
                         "/health": json_route(lambda: coordinator_health(coordinator))},
                        host, port, name="fleet metrics")
