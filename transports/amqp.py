"""AMQP 0-9-1 transport (aio-pika): persistent, confirmed, mandatory publishes; reply-to acks.

Device side publishes each encoded batch as a persistent message to the durable topic
exchange ``exchange`` with routing key ``<routing_prefix>.<device_id>``, ``mandatory``
(an unroutable batch comes back as an error, not a silent loss), on a channel with
publisher confirms. ``reply_to`` names the device's exclusive callback queue and
``correlation_id`` the batch id; the ingest's Ack comes back there (end-to-end). With
``end_to_end = false`` the broker's confirm is the ack (weaker: persisted by the broker,
not yet committed by the ingest).

Cloud side: competing consumers on the durable queue ``queue`` (bound to
``<routing_prefix>.*``) with ``prefetch`` unacked deliveries each; a delivery is acked to
the broker only after the ingest answered, so a crashed replica's batches are redelivered
(and deduplicated by the store). Identity: the routing key's device segment, or the
broker-validated ``user_id`` with ``identity = "user_id"``.

Throttling: an Ack ``throttled`` -> :class:`ThrottledError`; with ``max_queue_length`` the
queue is declared ``x-overflow = reject-publish``, so when ingest falls behind the broker
nacks publishes and the device gets :class:`ThrottledError` (``throttle_retry_after_s``).

A cluster (``hosts``): every client holds one connection to one node. A device starts on
the node its id hashes to (devices spread over the nodes) and, when its connection is
lost, connects to the next node on its next send; a refused node is skipped within the
same attempt. A new ingest queue is a quorum queue (``queue_type = "auto"``, the default,
or ``"quorum"``): each message is on a majority of the nodes before the publisher confirm,
so a node that dies takes nothing with it, and consumers on the other nodes go on after
the queue elects a new leader. An existing queue is used as it is with ``auto`` (a classic
queue made by an earlier version keeps working: RabbitMQ cannot redeclare a queue as
another type). The ingest watches its connection, its channel and its consumer (a broker
may cancel it); when one goes it reconnects to the next node with capped, jittered backoff
(``reconnect_max_s``), declares the topology again and consumes again. Deliveries it had
not acked go back to the queue with the connection and reach a replica again; the store
answers them ``duplicate`` if they were committed.

No aio-pika or aiormq type or exception leaves this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import ssl
import zlib
from typing import Any

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
import aiormq.exceptions

from pymigrate.clock import Clock, WallClock
from pymigrate.envelope import decode_ack, encode_ack
from pymigrate.errors import DecodeError, PyMigrateError, ThrottledError, TransportError
from pymigrate.types import Ack
from transports._common import AckWaiters, KeyedLocks, check_ack, client_tls_context, transport_ack
from transports.base import Incoming, IngestHandler
from transports.config import AmqpConfig

log = logging.getLogger(__name__)

__all__ = ["AmqpIngestServer", "AmqpUplink"]

# everything the library raises for a broken link, a closed channel or a refused login
_LINK_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError, aio_pika.exceptions.AMQPException, ConnectionError, OSError,
    TimeoutError, ssl.SSLError, RuntimeError)


def _tls(cfg: AmqpConfig) -> ssl.SSLContext | None:
    if not cfg.use_tls:
        return None
    return client_tls_context("uplink.amqp", cfg.ca_file, cfg.cert_file, cfg.key_file,
                              verify_hostname=cfg.tls_verify_hostname)


async def _connect(cfg: AmqpConfig, ctx: ssl.SSLContext | None, host: str,
                   port: int) -> aio_pika.abc.AbstractConnection:
    kw: dict[str, Any] = dict(host=host, port=port, login=cfg.username,
                              password=cfg.password, virtualhost=cfg.virtualhost,
                              timeout=cfg.connect_timeout_s)
    if ctx is not None:
        kw.update(ssl=True, ssl_context=ctx)
    conn: aio_pika.abc.AbstractConnection = await aio_pika.connect(**kw)
    return conn


def _is_auth(exc: BaseException) -> bool:
    return isinstance(exc, (aiormq.exceptions.AuthenticationError,
                            aiormq.exceptions.ProbableAuthenticationError))


async def _connect_any(cfg: AmqpConfig, ctx: ssl.SSLContext | None, start: int, *,
                       who: str) -> tuple[aio_pika.abc.AbstractConnection, int]:
    """Connect to the first node that answers, trying ``cfg.endpoints()`` in order from
    index ``start``; returns the connection and the node's index. Raises TransportError
    (``reason="auth"``, not retriable, as soon as a node refuses the login: every node
    of a cluster shares the users)."""
    eps = cfg.endpoints()
    failures: list[str] = []
    last: BaseException | None = None
    for k in range(len(eps)):
        i = (start + k) % len(eps)
        host, port = eps[i]
        try:
            return await _connect(cfg, ctx, host, port), i
        except _LINK_ERRORS as exc:
            failures.append(f"{host}:{port}: {exc or type(exc).__name__}")
            if _is_auth(exc):
                raise TransportError(f"AMQP login to {host}:{port} refused: {exc}",
                                     device=who, reason="auth", retriable=False) from exc
            last = exc
    raise TransportError(f"AMQP connect failed on every node: {'; '.join(failures)}",
                         device=who, reason="transport") from last


class _Link:
    """One device connection: confirmed channel, exchange, exclusive callback queue."""

    def __init__(self, conn: aio_pika.abc.AbstractConnection,
                 channel: aio_pika.abc.AbstractChannel,
                 exchange: aio_pika.abc.AbstractExchange,
                 replies: aio_pika.abc.AbstractQueue | None) -> None:
        self.conn = conn
        self.channel = channel
        self.exchange = exchange
        self.replies = replies

    @property
    def alive(self) -> bool:
        return not self.conn.is_closed and not self.channel.is_closed

    async def close(self) -> None:
        with contextlib.suppress(*_LINK_ERRORS):
            await asyncio.wait_for(self.conn.close(), 1.0)


class AmqpUplink:
    """Device-side AMQP uplink; ``send()`` returns the ingest's Ack via reply-to."""

    name = "amqp"

    def __init__(self, cfg: AmqpConfig, *, device_id: str, clock: Clock | None = None) -> None:
        self.cfg = cfg
        self.device_id = device_id
        self.clock = clock or WallClock()
        self.max_payload = cfg.max_payload
        self.end_to_end = cfg.end_to_end
        self.routing_key = f"{cfg.routing_prefix}.{device_id}"
        self._tls = _tls(cfg)
        self._link: _Link | None = None
        self._lock = asyncio.Lock()
        self._waiters = AckWaiters()
        self._endpoints = cfg.endpoints()
        # devices spread over the nodes; each moves on to the next one when its link goes
        self._node = zlib.crc32(device_id.encode()) % len(self._endpoints)

    async def connect(self) -> None:
        """Connect, open a confirmed channel, declare the exchange and the reply queue
        (bounded: every node's connect timeout, plus one for the set-up)."""
        budget = self.cfg.connect_timeout_s * (len(self._endpoints) + 1)
        try:
            await asyncio.wait_for(self._ensure(), budget)
        except TimeoutError as exc:
            raise TransportError(f"AMQP connect timed out after {budget:.1f}s",
                                 device=self.device_id) from exc

    async def _ensure(self) -> _Link:
        async with self._lock:
            if self._link is not None and self._link.alive:
                return self._link
            if self._link is not None:
                await self._link.close()
                self._link = None
            conn, self._node = await _connect_any(self.cfg, self._tls, self._node,
                                                  who=self.device_id)
            try:
                channel = await conn.channel(publisher_confirms=True, on_return_raises=True)
                exchange = await channel.declare_exchange(
                    self.cfg.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
                replies = None
                if self.end_to_end:
                    replies = await channel.declare_queue("", exclusive=True, auto_delete=True)
                    await replies.consume(self._on_reply, no_ack=True)
            except _LINK_ERRORS as exc:
                with contextlib.suppress(*_LINK_ERRORS):
                    await conn.close()
                host, port = self._endpoints[self._node]
                self._next_node()
                raise TransportError(f"AMQP set-up on {host}:{port} failed: "
                                     f"{exc or type(exc).__name__}", device=self.device_id,
                                     reason="transport") from exc
            conn.close_callbacks.add(self._on_close)
            self._link = _Link(conn, channel, exchange, replies)
            return self._link

    def _next_node(self) -> None:
        """Rotate: the next connect starts at the next node of the cluster."""
        self._node = (self._node + 1) % len(self._endpoints)

    def _on_close(self, conn: object = None, *_: object) -> None:
        if self._link is not None and self._link.conn is conn:
            self._link = None
            self._next_node()
        self._fail_all(TransportError("AMQP connection lost", device=self.device_id))

    async def _on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        try:
            ack = decode_ack(message.body)
        except DecodeError:
            log.warning("AMQP uplink %s: undecodable ack", self.device_id)
            return
        self._waiters.resolve(message.correlation_id or ack.batch_id, ack)

    @property
    def stale_acks(self) -> int:
        """Acks for batches nobody waits for any more (late, duplicate)."""
        return self._waiters.stale

    def _fail_all(self, exc: PyMigrateError) -> None:
        self._waiters.fail_all(exc)

    async def send(self, payload: bytes, *, batch_id: str, timeout: float) -> Ack:  # noqa: ASYNC109
        """Publish (persistent, mandatory, confirmed) and wait for the Ack.

        Raises TransportError (link, unroutable, timeout), ThrottledError (broker nack or
        Ack ``throttled``) or PayloadRejected.
        """
        deadline = self.clock.monotonic() + timeout
        try:
            link = await asyncio.wait_for(self._ensure(), timeout)
        except TimeoutError as exc:
            raise TransportError(f"AMQP connect timed out after {timeout:.1f}s",
                                 batch_id=batch_id) from exc
        fut: asyncio.Future[Ack] | None = None
        if self.end_to_end:
            fut = self._waiters.register(batch_id)
        msg = aio_pika.Message(
            payload, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            content_type="application/vnd.pymigrate.batch", message_id=batch_id,
            correlation_id=batch_id,
            reply_to=link.replies.name if link.replies is not None else None,
            user_id=self.cfg.username if self.cfg.identity == "user_id" else None)
        try:
            try:
                # our own bound: the library's publish timeout does not cover the wait for
                # the confirm, which never comes if the queue's leader died holding it
                left = max(0.01, deadline - self.clock.monotonic())
                await asyncio.wait_for(link.exchange.publish(msg, self.routing_key,
                                                             mandatory=True, timeout=left), left)
            except aio_pika.exceptions.PublishError as exc:
                raise TransportError(f"AMQP batch {batch_id} unroutable: no queue bound to "
                                     f"{self.cfg.exchange}/{self.routing_key}",
                                     reason="unroutable", batch_id=batch_id) from exc
            except aio_pika.exceptions.DeliveryError as exc:
                # a broker nack: the ingest queue is full (x-overflow reject-publish), or
                # a quorum queue could not take the message (no leader yet). A channel
                # that published to a queue whose leader died can stay in a state where
                # the broker nacks all it sends: the next attempt opens a fresh one
                await self._drop(link)
                raise ThrottledError(f"AMQP broker nacked batch {batch_id}",
                                     retry_after_s=self.cfg.throttle_retry_after_s,
                                     batch_id=batch_id) from exc
            except _LINK_ERRORS as exc:
                await self._drop(link)
                raise TransportError(f"AMQP publish of {batch_id} failed: "
                                     f"{exc or type(exc).__name__}", batch_id=batch_id) from exc
            if fut is None:
                return transport_ack(batch_id, self.clock.time_ms())
            try:
                ack = await self._waiters.wait(fut, deadline, self.clock)
            except TimeoutError as exc:
                await self._drop(link)
                raise TransportError(f"no AMQP ack for {batch_id} within {timeout:.1f}s",
                                     batch_id=batch_id) from exc
        finally:
            self._waiters.discard(batch_id, fut)
        return check_ack(ack, batch_id, "amqp")

    async def _drop(self, link: _Link) -> None:
        if self._link is link:
            self._link = None
            self._next_node()
        await link.close()

    async def close(self) -> None:
        """Close the connection (the exclusive reply queue goes with it)."""
        link, self._link = self._link, None
        if link is not None:
            await link.close()
        self._fail_all(TransportError("AMQP uplink closed", device=self.device_id))


class AmqpIngestServer:
    """Cloud-side AMQP ingest: one of any number of competing consumers on ``queue``."""

    name = "amqp"

    def __init__(self, cfg: AmqpConfig, *, clock: Clock | None = None) -> None:
        self.cfg = cfg
        self.clock = clock or WallClock()
        self._tls = _tls(cfg)
        self._conn: aio_pika.abc.AbstractConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._queue: aio_pika.abc.AbstractQueue | None = None
        self._tag: str | None = None
        self._handler: IngestHandler | None = None
        self._locks = KeyedLocks()
        self._tasks: set[asyncio.Task[None]] = set()
        self._endpoints = cfg.endpoints()
        self._node = os.getpid() % len(self._endpoints)  # replicas spread over the nodes
        self._lost = asyncio.Event()
        self._stopping = False
        self._supervisor: asyncio.Task[None] | None = None
        self.handled = 0
        self.redelivered = 0  # deliveries the broker had given to a consumer before
        self.reconnects = 0  # connections re-established after a loss

    @property
    def node(self) -> str:
        """``host:port`` of the node this consumer is (or was last) connected to."""
        host, port = self._endpoints[self._node]
        return f"{host}:{port}"

    def _queue_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {}
        if self.cfg.queue_type in ("quorum", "auto"):
            args["x-queue-type"] = "quorum"
        if self.cfg.max_queue_length:
            args |= {"x-max-length": self.cfg.max_queue_length, "x-overflow": "reject-publish"}
        return args

    async def start(self, handler: IngestHandler) -> None:
        """Connect to a node, declare exchange, queue and binding, consume; then watch the
        connection and reconnect (to the next node) whenever it goes."""
        self._handler = handler
        self._stopping = False
        try:
            await self._open()
        except TransportError:
            await self.stop()
            raise
        self._supervisor = asyncio.create_task(self._supervise(),
                                               name=f"amqp-ingest[{self.cfg.queue}]")

    async def _open(self) -> None:
        """One connection, channel, topology and consumer; TransportError if none."""
        conn, self._node = await _connect_any(self.cfg, self._tls, self._node,
                                              who="ingest")
        try:
            # bounded: a declare can wait on a queue whose leader is gone
            await asyncio.wait_for(self._setup(conn), self.cfg.connect_timeout_s * 2)
        except _LINK_ERRORS as exc:  # TimeoutError among them
            with contextlib.suppress(*_LINK_ERRORS):
                await asyncio.wait_for(conn.close(), 2.0)
            self._conn = self._channel = self._queue = None
            self._tag = None
            self._next_node()
            if isinstance(exc, aiormq.exceptions.ChannelPreconditionFailed):
                raise TransportError(
                    f"AMQP queue {self.cfg.queue} exists with other arguments than "
                    f"{self._queue_args()} ({exc}): set cloud.amqp.queue_type (and "
                    "max_queue_length) to what it was declared with, or use a new queue "
                    "name", reason="config", retriable=False) from exc
            raise TransportError(f"AMQP ingest cannot consume {self.cfg.queue} on "
                                 f"{self.node}: {exc or type(exc).__name__}") from exc

    async def _setup(self, conn: aio_pika.abc.AbstractConnection) -> None:
        existing = self.cfg.queue_type == "auto" and await self._queue_exists(conn)
        channel = await conn.channel()
        await channel.set_qos(prefetch_count=self.cfg.prefetch)
        exchange = await channel.declare_exchange(
            self.cfg.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        if existing:  # "auto": a queue that exists is used as it is (e.g. a classic one)
            queue = await channel.declare_queue(self.cfg.queue, passive=True)
        else:
            queue = await channel.declare_queue(self.cfg.queue, durable=True,
                                                arguments=self._queue_args() or None)
        await queue.bind(exchange, f"{self.cfg.routing_prefix}.*")
        self._conn, self._channel, self._queue = conn, channel, queue
        self._lost.clear()
        for source in (conn, channel):
            source.close_callbacks.add(self._on_lost)
        underlay = await channel.get_underlay_channel()
        underlay.on_consumer_cancel_callbacks.add(self._on_cancelled)
        self._tag = await queue.consume(self._on_message)

    async def _queue_exists(self, conn: aio_pika.abc.AbstractConnection) -> bool:
        """Whether ``queue`` exists (a passive declare on a channel of its own: the
        broker closes the channel when it does not)."""
        probe = await conn.channel()
        try:
            await probe.declare_queue(self.cfg.queue, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        finally:
            with contextlib.suppress(*_LINK_ERRORS):
                await probe.close()
        return True

    def _next_node(self) -> None:
        self._node = (self._node + 1) % len(self._endpoints)

    def _on_lost(self, source: object = None, *_: object) -> None:
        if source is self._conn or source is self._channel:
            self._lost.set()

    def _on_cancelled(self, *_: object) -> None:
        # the broker cancelled our consumer (its queue went away with a node, or was
        # deleted): consume again from scratch
        self._lost.set()

    async def _supervise(self) -> None:
        """Wait for a loss, then reconnect with capped, jittered backoff (no polling)."""
        rng = random.Random()
        while True:
            await self._lost.wait()
            if self._stopping:
                return
            old, self._conn = self._conn, None
            self._channel = self._queue = None
            self._tag = None
            log.warning("AMQP ingest lost its link to %s; reconnecting", self.node)
            if old is not None:
                with contextlib.suppress(*_LINK_ERRORS):
                    await asyncio.wait_for(old.close(), 2.0)
            self._next_node()
            delay = 0.1
            while not self._stopping:
                try:
                    await self._open()
                except TransportError as exc:
                    log.warning("AMQP ingest reconnect failed (next try in %.1fs): %s",
                                delay, exc)
                    await self.clock.sleep(delay * rng.uniform(0.5, 1.0))
                    delay = min(delay * 2, self.cfg.reconnect_max_s)
                    continue
                self.reconnects += 1
                log.warning("AMQP ingest consuming %s again on %s", self.cfg.queue, self.node)
                break

    def _identity(self, message: aio_pika.abc.AbstractIncomingMessage) -> str:
        """The device the broker vouches for; "" (nobody: the batch is refused as a
        device mismatch) when the message carries no such identity."""
        if self.cfg.identity == "user_id":
            return message.user_id or ""
        key = message.routing_key or ""
        head = f"{self.cfg.routing_prefix}."
        return key[len(head):] if key.startswith(head) else ""

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._handle(message)
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def _handle(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        device = self._identity(message)
        channel = self._channel  # the one that delivered it (before any reconnect)
        assert self._handler is not None and channel is not None
        async with self._locks.hold(device):
            try:
                ack = await self._handler(Incoming(
                    bytes(message.body), "amqp", device,
                    f"amqp user={message.user_id or '?'} routing_key={message.routing_key}"))
            except Exception as exc:  # a handler bug must not kill the consumer
                log.exception("AMQP ingest handler failed")
                t = self.clock.time_ms()
                ack = Ack(batch_id=message.correlation_id or "", status="error",
                          t_recv_ms=t, t_send_ms=t, reason=type(exc).__name__)
        self.handled += 1
        if message.redelivered:  # a replica died (or lost its link) holding it
            self.redelivered += 1
        try:
            if message.reply_to:
                reply = aio_pika.Message(encode_ack(ack), correlation_id=message.correlation_id,
                                         content_type="application/json")
                await channel.default_exchange.publish(reply, message.reply_to,
                                                       mandatory=False)
            # only now may the broker forget the batch: a crash before this redelivers it
            await message.ack()
        except _LINK_ERRORS as exc:  # redelivered to a replica; the store deduplicates
            log.warning("AMQP ingest could not answer %s: %s", message.correlation_id, exc)

    async def stop(self) -> None:
        """Stop reconnecting, cancel the consumer, let running handlers finish, close."""
        self._stopping = True
        self._lost.set()
        if self._supervisor is not None:
            sup, self._supervisor = self._supervisor, None
            if sup is not asyncio.current_task():
                sup.cancel()
                await asyncio.gather(sup, return_exceptions=True)
        if self._queue is not None and self._tag is not None:
            with contextlib.suppress(*_LINK_ERRORS):
                await self._queue.cancel(self._tag)
        self._tag = None
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(*_LINK_ERRORS):
                await asyncio.wait_for(conn.close(), 2.0)
        log.info("AMQP ingest stopped: handled=%d redelivered=%d reconnects=%d", self.handled,
                 self.redelivered, self.reconnects)

    async def delete_topology(self) -> None:
        """Delete the queue and the exchange (tests use unique names and clean up);
        call before :meth:`stop`."""
        if self._channel is not None and self._queue is not None:
            with contextlib.suppress(*_LINK_ERRORS):
                if self._tag is not None:
                    tag, self._tag = self._tag, None
                    await self._queue.cancel(tag)
                await self._queue.delete(if_unused=False, if_empty=False)
                await self._channel.exchange_delete(self.cfg.exchange)
