"""MQTT transport (aiomqtt 2.x): QoS 1 uplink with an end-to-end ack, shared-subscription ingest.

Topics (``prefix`` defaults to ``pymigrate``):

- device -> cloud: ``<prefix>/up/<device_id>``, QoS 1, payload = encoded batch;
- cloud -> device: ``<prefix>/ack/<device_id>``, QoS 1, payload = encoded :class:`Ack`.

MQTT 5: the publish carries Response Topic = the ack topic and Correlation Data = the
batch id; the ingest answers on that topic with the same correlation data. MQTT 3.1.1 has
no properties: the ingest answers on the conventional ack topic and the device matches
the ``batch_id`` inside the Ack. The device session is persistent (client id = device id,
clean start off, session expiry) so an ack published while the device was briefly away
is delivered when it comes back.

The ingest subscribes ``$share/<group>/<prefix>/up/+``: replicas in one group split the
load. The topic's device segment is the channel identity (broker ACLs must bind each
client to its own topics). A throttled batch is answered with Ack ``throttled`` and
``retry_after_s`` and, on MQTT 5, the reason code 0x97 (Quota exceeded) as a user
property; the device raises :class:`ThrottledError`. (aiomqtt 2.x does not expose PUBACK
reason codes, so a broker-side 0x97 on PUBACK is not observable here.)

No aiomqtt or paho type or exception leaves this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import uuid

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from pymigrate.clock import Clock, WallClock
from pymigrate.envelope import decode_ack, encode_ack
from pymigrate.errors import DecodeError, PyMigrateError, TransportError
from pymigrate.types import Ack
from transports._common import AckWaiters, KeyedLocks, check_ack, client_tls_context, transport_ack
from transports.base import Incoming, IngestHandler
from transports.config import MqttConfig

log = logging.getLogger(__name__)

__all__ = ["MqttIngestServer", "MqttUplink", "ack_topic", "up_topic"]

QUOTA_EXCEEDED = 0x97  # MQTT 5 reason code


def up_topic(prefix: str, device_id: str) -> str:
    """The uplink topic of ``device_id``."""
    return f"{prefix}/up/{device_id}"


def ack_topic(prefix: str, device_id: str) -> str:
    """The topic ``device_id`` receives its acks on."""
    return f"{prefix}/ack/{device_id}"


def _tls(cfg: MqttConfig) -> ssl.SSLContext | None:
    if not cfg.use_tls:
        return None
    return client_tls_context("uplink.mqtt", cfg.ca_file, cfg.cert_file, cfg.key_file,
                              verify_hostname=cfg.tls_verify_hostname)


class _Connection:
    """One aiomqtt client session plus its reader task; a new one per (re)connect."""

    def __init__(self, cfg: MqttConfig, client_id: str, *, clean: bool,
                 tls: ssl.SSLContext | None) -> None:
        v5 = cfg.protocol == "5"
        props: Properties | None = None
        kwargs: dict[str, object] = {}
        if v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            if not clean:
                props.SessionExpiryInterval = cfg.session_expiry_s
            kwargs["clean_start"] = clean
        else:
            kwargs["clean_session"] = clean
        self.client = aiomqtt.Client(
            cfg.host, cfg.port, identifier=client_id,
            username=cfg.username or None, password=cfg.password or None,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            keepalive=cfg.keepalive_s, timeout=cfg.connect_timeout_s,
            properties=props, tls_context=tls,
            # small request/response exchanges: Nagle would add ~40 ms per hop
            socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
            max_queued_incoming_messages=10_000, **kwargs)  # type: ignore[arg-type]
        self.reader: asyncio.Task[None] | None = None
        self.dead = False  # the link is gone (reader saw the disconnect) or closing
        self.lost = asyncio.Event()  # set when the reader saw the link go
        self._closing = False

    def _watch_refusal(self) -> asyncio.Future[str]:
        """A future set when the socket drops before CONNACK.

        aiomqtt ignores a disconnect before CONNACK and keeps waiting for the timeout
        (e.g. when a TLS 1.3 broker refuses our certificate with an alert after our side
        of the handshake). paho's ``on_disconnect`` still fires: chain onto it.
        """
        loop = asyncio.get_running_loop()
        refused: asyncio.Future[str] = loop.create_future()
        paho = getattr(self.client, "_client", None)
        inner = getattr(paho, "on_disconnect", None)
        if paho is None or inner is None:
            return refused

        def on_disconnect(*args: object) -> None:
            def note() -> None:
                if not refused.done():
                    refused.set_result(str(args[3]) if len(args) > 3 else "disconnected")
            loop.call_soon_threadsafe(note)
            inner(*args)
        paho.on_disconnect = on_disconnect
        return refused

    async def open(self, timeout: float) -> None:  # noqa: ASYNC109
        refused = self._watch_refusal()
        enter = asyncio.ensure_future(self.client.__aenter__())
        try:
            done, _ = await asyncio.wait((enter, refused), timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not refused.done():
                refused.cancel()
        if enter in done:
            enter.result()
            return
        enter.cancel()
        with contextlib.suppress(BaseException):
            await enter
        if refused in done and not refused.cancelled():
            raise aiomqtt.MqttError(f"connection closed before CONNACK "
                                    f"({refused.result()})")
        raise TimeoutError

    async def close(self, *, grace_s: float = 1.0) -> None:
        """Disconnect; if the peer does not answer within ``grace_s``, drop the socket."""
        self.dead = True
        if self._closing:
            return
        self._closing = True
        if self.reader is not None and self.reader is not asyncio.current_task():
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.reader
        try:
            await asyncio.wait_for(self.client.__aexit__(None, None, None), grace_s)
        except (TimeoutError, aiomqtt.MqttError, OSError, RuntimeError):
            # half-open link: stop waiting for DISCONNECT to be answered
            with contextlib.suppress(Exception):
                self.client._client._sock_close()


def _connect_error(cfg: MqttConfig, exc: BaseException, *, device: str) -> TransportError:
    """Classify a failed connect. A broker certificate we do not trust cannot be fixed by
    retrying (``retriable=False``, reason ``tls``); a refused CONNECT with a bad
    username/password or "not authorized" neither (reason ``auth``); the rest is a link."""
    text = str(exc) or type(exc).__name__
    where = f"MQTT connect to {cfg.host}:{cfg.port} failed: {text}"
    # aiomqtt re-raises socket/TLS errors as MqttError(str(exc)): the text is all there is
    if isinstance(exc, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in text:
        return TransportError(where, reason="tls", retriable=False, device=device)
    rc = getattr(exc, "rc", None)
    if rc is not None and str(rc).lower() in ("not authorized", "bad user name or password"):
        return TransportError(where, reason="auth", retriable=False, device=device)
    return TransportError(where, device=device)


def _props(msg: aiomqtt.Message, name: str) -> object:
    return getattr(msg.properties, name, None) if msg.properties is not None else None


class MqttUplink:
    """Device-side MQTT uplink; ``send()`` returns the cloud ingest's Ack (end-to-end)."""

    name = "mqtt"

    def __init__(self, cfg: MqttConfig, *, device_id: str, clock: Clock | None = None) -> None:
        self.cfg = cfg
        self.device_id = device_id
        self.clock = clock or WallClock()
        self.max_payload = cfg.max_payload
        self.end_to_end = cfg.end_to_end
        self._client_id = cfg.client_id or device_id
        self._up = up_topic(cfg.prefix, device_id)
        self._ack = ack_topic(cfg.prefix, device_id)
        self._tls = _tls(cfg)
        self._conn: _Connection | None = None
        self._lock = asyncio.Lock()
        self._waiters = AckWaiters()
        self._last_error = ""  # the connect failure last logged

    async def connect(self) -> None:
        """Open the session and subscribe to the ack topic (idempotent)."""
        await self._ensure(self.cfg.connect_timeout_s)

    async def _ensure(self, timeout: float) -> _Connection:  # noqa: ASYNC109
        async with self._lock:
            if self._conn is not None and not self._conn.dead:
                return self._conn
            conn = _Connection(self.cfg, self._client_id, clean=self.cfg.clean_start,
                               tls=self._tls)
            try:
                await conn.open(timeout)
                if self.end_to_end:
                    await conn.client.subscribe(self._ack, qos=1, timeout=timeout)
            except (aiomqtt.MqttError, OSError, TimeoutError, ssl.SSLError) as exc:
                await conn.close(grace_s=0.2)
                err = _connect_error(self.cfg, exc, device=self.device_id)
                if str(err) != self._last_error:  # once per distinct failure, not per retry
                    self._last_error = str(err)
                    log.warning("%s (retrying with backoff)", err)
                raise err from exc
            if self._last_error:
                log.warning("MQTT uplink connected to %s:%s", self.cfg.host, self.cfg.port)
                self._last_error = ""
            conn.reader = asyncio.create_task(self._read(conn), name=f"mqtt[{self.device_id}]")
            self._conn = conn
            return conn

    async def _read(self, conn: _Connection) -> None:
        try:
            async for msg in conn.client.messages:
                self._on_ack(msg)
        except aiomqtt.MqttError as exc:
            log.info("MQTT uplink %s disconnected: %s", self.device_id, exc)
        finally:
            conn.dead = True
            conn.lost.set()
            self._fail_all(TransportError("MQTT connection lost", device=self.device_id))

    def _on_ack(self, msg: aiomqtt.Message) -> None:
        try:
            ack = decode_ack(bytes(msg.payload))
        except DecodeError:
            log.warning("MQTT uplink %s: undecodable ack on %s", self.device_id, msg.topic)
            return
        corr = _props(msg, "CorrelationData")
        batch_id = corr.decode("utf-8", "replace") if isinstance(corr, bytes) else ack.batch_id
        self._waiters.resolve(batch_id, ack)

    @property
    def stale_acks(self) -> int:
        """Acks for batches nobody waits for any more (late, duplicate)."""
        return self._waiters.stale

    def _fail_all(self, exc: PyMigrateError) -> None:
        self._waiters.fail_all(exc)

    async def send(self, payload: bytes, *, batch_id: str, timeout: float) -> Ack:  # noqa: ASYNC109
        """Publish at QoS 1 and wait for the end-to-end Ack (or only the PUBACK).

        Raises TransportError (retriable: connect failure, lost link, timeout),
        ThrottledError or PayloadRejected (from the Ack).
        """
        deadline = self.clock.monotonic() + timeout
        conn = await self._ensure(timeout)
        fut: asyncio.Future[Ack] | None = None
        if self.end_to_end:
            fut = self._waiters.register(batch_id)
        props: Properties | None = None
        if self.cfg.protocol == "5":
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = self._ack
            props.CorrelationData = batch_id.encode()
        try:
            try:
                await self._publish(conn, payload, props, deadline)
            except (aiomqtt.MqttError, ConnectionError) as exc:
                await self._drop(conn)
                raise TransportError(f"MQTT publish of {batch_id} failed: {exc}",
                                     batch_id=batch_id) from exc
            if fut is None:
                return transport_ack(batch_id, self.clock.time_ms())
            try:
                ack = await self._waiters.wait(fut, deadline, self.clock)
            except TimeoutError as exc:
                # a half-open link looks exactly like this: start over on the next send
                await self._drop(conn)
                raise TransportError(f"no MQTT ack for {batch_id} within {timeout:.1f}s",
                                     batch_id=batch_id) from exc
        finally:
            self._waiters.discard(batch_id, fut)
        return check_ack(ack, batch_id, "mqtt")

    async def _publish(self, conn: _Connection, payload: bytes, props: Properties | None,
                       deadline: float) -> None:
        """QoS 1 publish until PUBACK; a lost link fails it at once.

        aiomqtt's publish waits for its PUBACK until the timeout even when the connection
        is already gone; the reader task notices the loss, so race against that.
        """
        pub = asyncio.ensure_future(conn.client.publish(
            self._up, payload, qos=1, properties=props,
            timeout=max(0.01, deadline - self.clock.monotonic())))
        lost = asyncio.ensure_future(conn.lost.wait())
        try:
            await asyncio.wait((pub, lost), return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
        if pub.done():
            pub.result()
            return
        pub.cancel()
        with contextlib.suppress(BaseException):
            await pub
        raise ConnectionError("connection lost before PUBACK")

    async def _drop(self, conn: _Connection) -> None:
        if self._conn is conn:
            self._conn = None
        await conn.close(grace_s=0.5)

    async def close(self) -> None:
        """Disconnect; the broker keeps the session (unless clean_start)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()
        self._fail_all(TransportError("MQTT uplink closed", device=self.device_id))


class MqttIngestServer:
    """Cloud-side MQTT ingest on a shared subscription; answers each batch with its Ack."""

    name = "mqtt"

    def __init__(self, cfg: MqttConfig, *, client_id: str | None = None,
                 clock: Clock | None = None, reconnect_max_s: float = 5.0) -> None:
        self.cfg = cfg
        self.clock = clock or WallClock()
        self.client_id = client_id or f"pymigrate-ingest-{uuid.uuid4().hex[:12]}"
        self.subscription = f"$share/{cfg.share_group}/{cfg.prefix}/up/+"
        self._tls = _tls(cfg)
        self._reconnect_max_s = reconnect_max_s
        self._handler: IngestHandler | None = None
        self._runner: asyncio.Task[None] | None = None
        self._conn: _Connection | None = None
        self._locks = KeyedLocks()
        self._slots = asyncio.Semaphore(cfg.max_inflight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._ready = asyncio.Event()
        self.handled = 0

    async def start(self, handler: IngestHandler) -> None:
        """Connect and subscribe (raises TransportError if the broker is unreachable now);
        afterwards a lost connection is re-established in the background."""
        self._handler = handler
        conn = await self._open()
        self._runner = asyncio.create_task(self._run(conn), name=f"mqtt-ingest[{self.client_id}]")

    async def _open(self) -> _Connection:
        conn = _Connection(self.cfg, self.client_id, clean=True, tls=self._tls)
        try:
            await conn.open(self.cfg.connect_timeout_s)
            await conn.client.subscribe(self.subscription, qos=1)
        except (aiomqtt.MqttError, OSError, TimeoutError, ssl.SSLError) as exc:
            await conn.close(grace_s=0.2)
            raise _connect_error(self.cfg, exc, device="") from exc
        self._conn = conn
        self._ready.set()
        return conn

    async def _run(self, conn: _Connection) -> None:
        backoff = 0.1
        while True:
            try:
                async for msg in conn.client.messages:
                    backoff = 0.1
                    await self._slots.acquire()
                    task = asyncio.create_task(self._handle(conn, msg))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
            except aiomqtt.MqttError as exc:
                log.warning("MQTT ingest %s lost its broker: %s", self.client_id, exc)
            self._ready.clear()
            await conn.close(grace_s=0.2)
            while True:  # reconnect with capped exponential backoff (sleep, not poll)
                await self.clock.sleep(backoff)
                backoff = min(self._reconnect_max_s, backoff * 2)
                try:
                    conn = await self._open()
                    break
                except TransportError as exc:
                    log.info("MQTT ingest reconnect failed: %s", exc)

    async def _handle(self, conn: _Connection, msg: aiomqtt.Message) -> None:
        try:
            topic = str(msg.topic)
            device = topic.rsplit("/", 1)[-1]
            assert self._handler is not None
            async with self._locks.hold(device):
                try:
                    ack = await self._handler(Incoming(bytes(msg.payload), "mqtt", device,
                                                       f"mqtt topic={topic}"))
                except Exception as exc:  # a handler bug must not kill the consumer
                    log.exception("MQTT ingest handler failed on %s", topic)
                    t = self.clock.time_ms()
                    ack = Ack(batch_id="", status="error", t_recv_ms=t, t_send_ms=t,
                              reason=type(exc).__name__)
            self.handled += 1
            await self._reply(conn, msg, device, ack)
        finally:
            self._slots.release()

    async def _reply(self, conn: _Connection, msg: aiomqtt.Message, device: str,
                     ack: Ack) -> None:
        resp = _props(msg, "ResponseTopic")
        corr = _props(msg, "CorrelationData")
        props: Properties | None = None
        if self.cfg.protocol == "5":
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if isinstance(corr, bytes):
                props.CorrelationData = corr
            if ack.status == "throttled":
                props.UserProperty = [("reason_code", str(QUOTA_EXCEEDED))]
        topic = resp if isinstance(resp, str) and resp else ack_topic(self.cfg.prefix, device)
        try:
            await conn.client.publish(topic, encode_ack(ack), qos=1, properties=props)
        except aiomqtt.MqttError as exc:  # the device times out and resends: idempotent
            log.warning("MQTT ingest could not publish ack to %s: %s", topic, exc)

    async def wait_ready(self, timeout: float) -> None:  # noqa: ASYNC109
        """Wait until subscribed (after start or a reconnect)."""
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError as exc:
            raise TransportError("MQTT ingest not subscribed") from exc

    async def stop(self) -> None:
        """Stop consuming, let running handlers finish, disconnect."""
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.close()
