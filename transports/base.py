"""One interface for every protocol, both directions.

Device side: :class:`Uplink` sends an encoded batch and returns the cloud's :class:`Ack`.
Cloud side: :class:`IngestServer` receives encoded batches and hands them to a handler
that returns the Ack to send back. No library type or exception crosses this boundary:
failures are :class:`TransportError` (retriable), :class:`ThrottledError` or
:class:`PayloadRejected`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol, runtime_checkable

import msgspec

from pymigrate.types import Ack


class Incoming(msgspec.Struct, frozen=True):
    """A batch as the cloud side received it.

    ``channel_device_id`` is the identity the channel vouches for (topic, client cert,
    authenticated user), or None when the channel carries none; the ingest refuses a
    batch whose envelope names another device.
    """

    payload: bytes
    transport: str
    channel_device_id: str | None = None
    peer: str = ""  # who sent it, as the transport knows it (address, topic, user)


IngestHandler = Callable[[Incoming], Awaitable[Ack]]


@runtime_checkable
class Uplink(Protocol):
    """Device-side transport."""

    name: str
    max_payload: int  # largest encoded batch this transport should be given, bytes
    end_to_end: bool  # True when send() returns only after the cloud ingest committed

    async def connect(self) -> None: ...

    async def send(self, payload: bytes, *, batch_id: str,
                   timeout: float) -> Ack:  # noqa: ASYNC109 - the retry controller sets it
        """Send one encoded batch and wait for its ack.

        Raises TransportError (retriable), ThrottledError, or PayloadRejected.
        """
        ...

    async def close(self) -> None: ...


@runtime_checkable
class IngestServer(Protocol):
    """Cloud-side transport endpoint."""

    name: str

    async def start(self, handler: IngestHandler) -> None: ...

    async def stop(self) -> None: ...
