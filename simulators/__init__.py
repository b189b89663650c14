"""Simulators: virtual-time driving, sensors and dataset replay, network models and a
fault proxy, constrained devices, fleets over the real cloud ingest, and the named field
scenarios behind ``pymigrate simulate`` (see :mod:`simulators.scenarios`).

Submodules are imported on demand (``from simulators.fleet import Fleet``): importing the
package itself stays cheap.
"""

__all__ = ["cli", "device", "driver", "fleet", "report", "scenarios", "sensors"]
