"""Coordinator-side job channel interface and an in-memory implementation.

A channel delivers device documents to the coordinator as ``(device_id, kind, payload)``
where ``device_id`` is the identity the channel vouches for (the topic it came on), and
sends documents to one device. ``transports.jobs_mqtt`` implements it over MQTT;
:class:`MemoryJobBus` connects a coordinator and in-process devices for tests.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

JobHandler = Callable[[str, str, bytes], Awaitable[None]]


class CoordinatorChannel(Protocol):
    """The coordinator's side of the job topics."""

    async def start(self, handler: JobHandler) -> None:
        """Start delivering device documents to ``handler``."""

    async def send(self, device_id: str, kind: str, payload: bytes) -> None:
        """Send a document to one device."""

    async def stop(self) -> None:
        """Stop delivering and release resources."""


class MemoryJobBus:
    """In-process job topics: one coordinator endpoint, any number of device links."""

    def __init__(self) -> None:
        self._coordinator: JobHandler | None = None
        self._devices: dict[str, JobHandler] = {}
        self.sent: list[tuple[str, str, bytes]] = []  # coordinator -> device log
        self.dropped = 0  # sent to a device that is not connected

    # coordinator side ----------------------------------------------------------------
    async def start(self, handler: JobHandler) -> None:
        self._coordinator = handler

    async def send(self, device_id: str, kind: str, payload: bytes) -> None:
        self.sent.append((device_id, kind, payload))
        h = self._devices.get(device_id)
        if h is None:
            self.dropped += 1
            return
        await h(device_id, kind, payload)

    async def stop(self) -> None:
        self._coordinator = None

    # device side ---------------------------------------------------------------------
    def link(self, device_id: str) -> MemoryDeviceLink:
        """A device-side link (see ``agent.jobs.DeviceLink``)."""
        return MemoryDeviceLink(self, device_id)

    async def from_device(self, device_id: str, kind: str, payload: bytes) -> None:
        """Deliver a document as if published on ``device_id``'s topic."""
        if self._coordinator is not None:
            await self._coordinator(device_id, kind, payload)


class MemoryDeviceLink:
    """Device side of :class:`MemoryJobBus`; ``topic_device`` lets tests impersonate."""

    def __init__(self, bus: MemoryJobBus, device_id: str) -> None:
        self.bus = bus
        self.device_id = device_id
        self.topic_device = device_id

    async def connect(self, handler: Callable[[str, bytes], Awaitable[None]]) -> None:
        async def deliver(_dev: str, kind: str, payload: bytes) -> None:
            await handler(kind, payload)

        self.bus._devices[self.device_id] = deliver

    async def publish(self, kind: str, payload: bytes) -> None:
        await self.bus.from_device(self.topic_device, kind, payload)

    async def close(self) -> None:
        self.bus._devices.pop(self.device_id, None)
