"""Fleet job topics over MQTT (aiomqtt 2.x), coordinator side and device side.

Topics per device: ``<prefix>/jobs/<device>/{notify,start,update,result}`` (QoS 1).
The coordinator subscribes to ``<prefix>/jobs/+/{start,update,result}`` (optionally as a
shared subscription) and vouches for the sender by the topic's device segment (broker
ACLs should bind each client to its own ``<prefix>/jobs/<client>/#``). Devices subscribe
to their own ``notify`` topic. :class:`MqttDeviceHub` carries many device sessions over
one connection (a gateway hosting several devices, or a fleet simulator); each device
still has its own subscription and topics.

Crash safety (coordinator side): the channel keeps a persistent session (fixed client
id, ``clean_session=False``) and acks device messages manually: :meth:`take_acks` /
:meth:`ack` let the coordinator send the PUBACK only after the commit that holds the
message's effects. A coordinator killed before that commit gets the message again from
the broker when it (or the standby taking over with the same client id) reconnects.

TLS: pass an ``ssl.SSLContext`` (:func:`tls_context` builds one from CA, client
certificate and key files) to either side.

No aiomqtt type or exception leaves this module: failures become
:class:`~pymigrate.errors.TransportError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiomqtt
import structlog

from pymigrate.clock import Clock, WallClock
from pymigrate.errors import TransportError
from transports._common import client_tls_context
from transports.jobs_protocol import Health, JobUpdate, encode

log = structlog.get_logger("pymigrate.transports.jobs_mqtt")

CoordinatorHandler = Callable[[str, str, bytes], Awaitable[None]]
DeviceHandler = Callable[[str, bytes], Awaitable[None]]
_UP_KINDS = ("start", "update", "result")


def topic(prefix: str, device_id: str, kind: str) -> str:
    """The job topic of ``device_id`` for ``kind``."""
    return f"{prefix}/jobs/{device_id}/{kind}"


def control_topic(prefix: str) -> str:
    """Topic the coordinator takes operator and ingest commands on."""
    return f"{prefix}/fleet/control"


def tls_context(section: str, ca_file: str = "", cert_file: str = "",
                key_file: str = "") -> ssl.SSLContext | None:
    """A client TLS context when any file is given (None: plain TCP); a file problem is a
    :class:`~pymigrate.errors.ConfigError` naming ``<section>.<key>``."""
    if not (ca_file or cert_file):
        return None
    return client_tls_context(section, ca_file, cert_file, key_file)


async def publish_once(hostname: str, port: int, name: str, payload: bytes, *,
                       tls: ssl.SSLContext | None = None, username: str | None = None,
                       password: str | None = None) -> None:
    """Connect, publish one QoS 1 message, disconnect (CLI control commands)."""
    try:
        async with aiomqtt.Client(hostname, port,
                                  identifier=f"pymigrate-cli-{uuid.uuid4().hex[:8]}",
                                  tls_context=tls, username=username,
                                  password=password) as c:
            await c.publish(name, payload, qos=1)
    except aiomqtt.MqttError as exc:
        raise TransportError(f"MQTT publish to {name} failed: {exc}") from exc


def _split(prefix: str, name: str) -> tuple[str, str] | None:
    head = f"{prefix}/jobs/"
    if not name.startswith(head):
        return None
    device, sep, kind = name[len(head):].rpartition("/")
    if not sep or not device or "/" in device:
        return None
    return device, kind


class _Session:
    """One aiomqtt connection with a reader task; reconnects with backoff after a lost
    link, resubscribes, then runs ``on_reconnect`` callbacks (devices pull pending jobs).
    Translates library errors into :class:`TransportError`."""

    def __init__(self, hostname: str, port: int, *, client_id: str | None,
                 username: str | None, password: str | None, will: aiomqtt.Will | None,
                 on_message: Callable[[str, bytes], Awaitable[None]], name: str,
                 clock: Clock | None = None, max_backoff_s: float = 30.0,
                 timeout_s: float = 10.0, tls: ssl.SSLContext | None = None,
                 persistent: bool = False, manual_ack: bool = False) -> None:
        self._client = aiomqtt.Client(hostname, port, identifier=client_id or
                                      f"pymigrate-{uuid.uuid4().hex[:12]}",
                                      username=username, password=password, will=will,
                                      max_queued_incoming_messages=100_000,
                                      timeout=timeout_s, tls_context=tls,
                                      clean_session=False if persistent else None)
        self._manual_ack = manual_ack
        if manual_ack:  # PUBACK only when the owner says the effects are durable
            self._client._client.manual_ack_set(True)
        self._gen = 0  # connection generation: a mid is only valid on its connection
        self._acks: list[tuple[int, int, int]] = []
        self._on_message = on_message
        self._name = name
        self._clock = clock or WallClock()
        self._max_backoff_s = max_backoff_s
        self._topics: list[str] = []
        self._reader: asyncio.Task[None] | None = None
        self._closing = False
        self.reconnects = 0
        self.on_reconnect: list[Callable[[], Awaitable[None]]] = []

    async def open(self, topics: list[str]) -> None:
        self._topics = list(topics)
        try:
            await self._client.__aenter__()
            if topics:
                await self._client.subscribe([(t, 1) for t in topics])
        except aiomqtt.MqttError as exc:
            raise TransportError(f"MQTT connect/subscribe failed: {exc}") from exc
        self._reader = asyncio.create_task(self._read(), name=self._name)

    async def _read(self) -> None:
        while True:
            try:
                async for message in self._client.messages:
                    payload = message.payload
                    data = payload if isinstance(payload, bytes) else str(payload).encode()
                    try:
                        await self._on_message(message.topic.value, data)
                    except Exception as exc:  # one bad document never stops the reader
                        log.error("job message handler failed", topic=message.topic.value,
                                  error=repr(exc))
                    if self._manual_ack and message.qos > 0:
                        self._acks.append((self._gen, message.mid, message.qos))
            except aiomqtt.MqttError as exc:
                log.warning("MQTT job session lost", session=self._name, error=str(exc))
            if self._closing:
                return
            await self._reconnect()

    def take_acks(self) -> list[tuple[int, int, int]]:
        """Handled messages not yet acked (manual ack mode)."""
        acks, self._acks = self._acks, []
        return acks

    def ack(self, acks: list[tuple[int, int, int]]) -> None:
        """Send the PUBACKs of handled messages; ones from an older connection are
        skipped (the broker redelivers those on the new one)."""
        for gen, mid, qos in acks:
            if gen == self._gen:
                self._client._client.ack(mid, qos)

    async def _reconnect(self) -> None:
        delay = 0.2
        self._gen += 1
        self._acks.clear()
        while True:
            await self._clock.sleep(delay)
            with contextlib.suppress(aiomqtt.MqttError):
                await self._client.__aexit__(None, None, None)
            try:
                await self._client.__aenter__()
                if self._topics:
                    await self._client.subscribe([(t, 1) for t in self._topics])
                break
            except aiomqtt.MqttError as exc:
                log.info("MQTT reconnect failed", session=self._name, error=str(exc))
                delay = min(delay * 2, self._max_backoff_s)
        self.reconnects += 1
        log.info("MQTT job session reconnected", session=self._name)
        for cb in self.on_reconnect:
            try:
                await cb()
            except Exception as exc:
                log.warning("reconnect callback failed", error=repr(exc))

    async def subscribe(self, name: str) -> None:
        self._topics.append(name)
        try:
            await self._client.subscribe(name, qos=1)
        except aiomqtt.MqttError as exc:
            raise TransportError(f"MQTT subscribe failed: {exc}") from exc

    async def unsubscribe(self, name: str) -> None:
        with contextlib.suppress(ValueError):
            self._topics.remove(name)
        try:
            await self._client.unsubscribe(name)
        except aiomqtt.MqttError as exc:
            raise TransportError(f"MQTT unsubscribe failed: {exc}") from exc

    async def publish(self, name: str, payload: bytes) -> None:
        try:
            await self._client.publish(name, payload, qos=1)
        except aiomqtt.MqttError as exc:
            raise TransportError(f"MQTT publish failed: {exc}") from exc

    async def close(self) -> None:
        self._closing = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        with contextlib.suppress(aiomqtt.MqttError):
            await self._client.__aexit__(None, None, None)


class MqttJobChannel:
    """Coordinator side: receives device documents, sends notifications."""

    def __init__(self, hostname: str = "127.0.0.1", port: int = 1883, *,
                 prefix: str = "pymigrate", client_id: str | None = None,
                 username: str | None = None, password: str | None = None,
                 share_group: str | None = None,
                 control: Callable[[bytes], Awaitable[None]] | None = None,
                 clock: Clock | None = None, tls: ssl.SSLContext | None = None,
                 persistent: bool = True) -> None:
        self.hostname, self.port, self.prefix = hostname, port, prefix
        self.control = control  # operator / ingest commands on <prefix>/fleet/control
        # one session per prefix: the replica that takes over resumes the same session
        self.client_id = client_id or f"pymigrate-fleet-{prefix}"
        self.username, self.password = username, password
        self.share_group = share_group
        self.clock = clock
        self.tls = tls
        self.persistent = persistent
        self._session: _Session | None = None
        self._handler: CoordinatorHandler | None = None
        self.unroutable = 0

    async def start(self, handler: CoordinatorHandler) -> None:
        """Connect, subscribe to every device's up topics, deliver to ``handler``."""
        self._handler = handler
        share = f"$share/{self.share_group}/" if self.share_group else ""
        topics = [share + topic(self.prefix, "+", k) for k in _UP_KINDS]
        if self.control is not None:
            topics.append(control_topic(self.prefix))
        self._session = _Session(self.hostname, self.port, client_id=self.client_id,
                                 username=self.username, password=self.password, will=None,
                                 on_message=self._route, name="fleet[mqtt-reader]",
                                 clock=self.clock, tls=self.tls, persistent=self.persistent,
                                 manual_ack=self.persistent)
        await self._session.open(topics)

    @property
    def pending_acks(self) -> int:
        """Handled device messages waiting for their commit (and PUBACK)."""
        return len(self._session._acks) if self._session is not None else 0

    def take_acks(self) -> list[Any]:
        """Device messages handled since the last call (ack them after the commit)."""
        return self._session.take_acks() if self._session is not None else []

    def restore_acks(self, acks: list[Any]) -> None:
        """Give back acks whose commit failed (acked after the next one)."""
        if self._session is not None:
            self._session._acks[:0] = acks

    def ack(self, acks: list[Any]) -> None:
        """PUBACK handled device messages (their effects are committed)."""
        if self._session is not None:
            self._session.ack(acks)

    async def _route(self, name: str, payload: bytes) -> None:
        if self.control is not None and name == control_topic(self.prefix):
            await self.control(payload)
            return
        parts = _split(self.prefix, name)
        if parts is None or parts[1] not in _UP_KINDS or self._handler is None:
            self.unroutable += 1
            return
        await self._handler(parts[0], parts[1], payload)

    async def send(self, device_id: str, kind: str, payload: bytes) -> None:
        """Publish to ``<prefix>/jobs/<device>/<kind>`` (QoS 1)."""
        if self._session is None:
            raise TransportError("job channel is not started")
        await self._session.publish(topic(self.prefix, device_id, kind), payload)

    async def stop(self) -> None:
        """Disconnect."""
        if self._session is not None:
            await self._session.close()
            self._session = None


class MqttDeviceHub:
    """Device side: one MQTT connection carrying the job topics of one or more devices."""

    def __init__(self, hostname: str = "127.0.0.1", port: int = 1883, *,
                 prefix: str = "pymigrate", client_id: str | None = None,
                 username: str | None = None, password: str | None = None,
                 will_device: str | None = None, clock: Clock | None = None,
                 max_backoff_s: float = 30.0, timeout_s: float = 10.0,
                 tls: ssl.SSLContext | None = None) -> None:
        self.prefix = prefix
        will = None
        if will_device is not None:  # tell the coordinator when this device drops off
            body = encode(JobUpdate(will_device, health=Health(online=False)))
            will = aiomqtt.Will(topic(prefix, will_device, "update"), body, qos=1)
        self._session = _Session(hostname, port, client_id=client_id, username=username,
                                 password=password, will=will, on_message=self._route,
                                 name=f"agent[jobs-mqtt:{client_id or 'hub'}]",
                                 clock=clock, max_backoff_s=max_backoff_s,
                                 timeout_s=timeout_s, tls=tls)
        self._handlers: dict[str, DeviceHandler] = {}
        self._open = False

    async def start(self) -> None:
        """Connect (device subscriptions are added by each link's ``connect``)."""
        await self._session.open([])
        self._open = True

    @property
    def reconnects(self) -> int:
        """How often the connection was re-established."""
        return self._session.reconnects

    async def stop(self) -> None:
        """Disconnect every device session of this hub."""
        self._open = False
        await self._session.close()

    def link(self, device_id: str) -> MqttDeviceLink:
        """The job link of one device (``agent.jobs.DeviceLink``)."""
        return MqttDeviceLink(self, device_id)

    async def _route(self, name: str, payload: bytes) -> None:
        parts = _split(self.prefix, name)
        if parts is None:
            return
        handler = self._handlers.get(parts[0])
        if handler is not None:
            await handler(parts[1], payload)


class MqttDeviceLink:
    """One device's job topics on a :class:`MqttDeviceHub`."""

    def __init__(self, hub: MqttDeviceHub, device_id: str) -> None:
        self.hub = hub
        self.device_id = device_id

    def on_reconnect(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run ``callback`` after the hub's connection came back (the jobs client pulls)."""
        self.hub._session.on_reconnect.append(callback)

    async def connect(self, handler: DeviceHandler) -> None:
        """Subscribe to this device's notify topic."""
        self.hub._handlers[self.device_id] = handler
        await self.hub._session.subscribe(topic(self.hub.prefix, self.device_id, "notify"))

    async def publish(self, kind: str, payload: bytes) -> None:
        """Publish on this device's ``kind`` topic."""
        await self.hub._session.publish(topic(self.hub.prefix, self.device_id, kind), payload)

    async def close(self) -> None:
        """Unsubscribe this device (the hub connection stays up)."""
        self.hub._handlers.pop(self.device_id, None)
        if self.hub._open:
            with contextlib.suppress(TransportError):
                await self.hub._session.unsubscribe(
                    topic(self.hub.prefix, self.device_id, "notify"))
