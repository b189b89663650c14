"""Subscribe to a local MQTT broker with acknowledgement deferred until acceptance.

QoS 1/2 messages are PUBACKed only when the caller says the readings are committed
(paho's manual-ack mode), so a crash before acceptance makes the broker redeliver.
No aiomqtt type leaves this module: messages are ``(topic, payload, ack)`` tuples and
errors are :class:`TransportError`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiomqtt

from pymigrate.errors import TransportError

Ack = Callable[[], Awaitable[None]]


class MqttSubscriber:
    """``async with sub.session() as messages: async for topic, payload, ack, mid in
    messages`` (``mid``: the packet identifier, which a broker keeps when it redelivers
    an unacknowledged message to a persistent session)."""

    def __init__(self, host: str, port: int, topics: list[str], *, qos: int = 1,
                 client_id: str = "", username: str = "", password: str = "",
                 persistent: bool = True) -> None:
        self.host, self.port, self.topics, self.qos = host, port, topics, qos
        self.client_id = client_id
        self.username, self.password = username or None, password or None
        self.persistent = persistent and bool(client_id)

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncIterator[tuple[str, bytes, Ack, int]]]:
        client = aiomqtt.Client(
            self.host, self.port, identifier=self.client_id or None,
            username=self.username, password=self.password,
            protocol=aiomqtt.ProtocolVersion.V311,
            clean_session=not self.persistent)
        # paho's manual ack: PUBACK only after we accepted the readings
        client._client.manual_ack_set(True)
        try:
            async with client:
                for t in self.topics:
                    await client.subscribe(t, qos=self.qos)
                yield self._iterate(client)
        except aiomqtt.MqttError as exc:
            raise TransportError(f"MQTT source {self.host}:{self.port}: {exc}") from exc

    async def _iterate(self, client: aiomqtt.Client
                       ) -> AsyncIterator[tuple[str, bytes, Ack, int]]:
        paho: Any = client._client
        try:
            async for msg in client.messages:
                payload = msg.payload if isinstance(msg.payload, bytes | bytearray) else (
                    str(msg.payload).encode() if msg.payload is not None else b"")
                mid, qos = msg.mid, msg.qos

                async def ack(mid: int = mid, qos: int = qos) -> None:
                    if qos > 0:
                        paho.ack(mid, qos)
                    await asyncio.sleep(0)

                yield str(msg.topic), bytes(payload), ack, int(mid or 0)
        except aiomqtt.MqttError as exc:
            raise TransportError(f"MQTT source connection lost: {exc}") from exc
