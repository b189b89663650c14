"""CoAP transport (aiocoap): confirmable POST, block-wise transfer for large batches,
and the ingest's response is the end-to-end ack.

Device side posts to ``coap://host:port/ingest/<device_id>``; the path names the device so
the cloud can check it against the envelope. Throttling travels as 5.03 Service
Unavailable with Max-Age (RFC 7252 §5.9.3.4); rejection as 4.00 Bad Request.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import socket
from urllib.parse import urlsplit

import aiocoap
import aiocoap.error
import aiocoap.resource
from aiocoap import Code, Message
from aiocoap.numbers.constants import TransportTuning

from pymigrate.envelope import decode_ack, encode_ack
from pymigrate.errors import DecodeError, PayloadRejected, ThrottledError, TransportError
from pymigrate.types import Ack
from transports.base import Incoming, IngestHandler

log = logging.getLogger(__name__)

# aiocoap does block-wise transfer itself; keep batches small enough for constrained peers.
DEFAULT_MAX_PAYLOAD = 256 * 1024
_SINGLE_BLOCK = 512  # bodies above this may go block-wise (aiocoap: 1024-byte blocks)


class CoapUplink:
    """Device-side CoAP uplink: confirmable POST to ``<uri>/<device_id>``.

    Bodies above one block go block-wise (Block1, done by aiocoap); the 2.04 response
    carries the ingest's Ack, so every Ack is end-to-end. Block-wise requests go one at a
    time: CoAP cannot tell apart two Block1 transfers from one endpoint to one resource
    (aiocoap does not send Request-Tag, aiocoap issue #58), so concurrent ones would be
    reassembled into one truncated body.
    """

    name = "coap"
    end_to_end = True

    def __init__(self, uri: str, *, device_id: str, max_payload: int = DEFAULT_MAX_PAYLOAD,
                 ack_timeout_s: float = 2.0) -> None:
        self._base = uri.rstrip("/")
        self._device_id = device_id
        self.max_payload = max_payload
        self._ctx: aiocoap.Context | None = None
        self._last_error = ""  # the failure last logged
        # RFC 7252 ACK_TIMEOUT (first retransmission; doubles each time): lower on LANs
        self._tuning = type("CoapTuning", (TransportTuning,), {"ACK_TIMEOUT": ack_timeout_s})()
        self._blockwise = asyncio.Lock()

    async def connect(self) -> None:
        """Create the client context (binds a UDP socket; no handshake)."""
        if self._ctx is None:
            try:
                self._ctx = await aiocoap.Context.create_client_context()
            except OSError as exc:
                raise TransportError(f"CoAP client socket: {exc}") from exc

    async def send(self, payload: bytes, *, batch_id: str, timeout: float) -> Ack:  # noqa: ASYNC109
        if self._ctx is None:
            await self.connect()
        msg = Message(code=Code.POST, uri=f"{self._base}/{self._device_id}", payload=payload,
                      transport_tuning=self._tuning)
        try:
            if len(payload) > _SINGLE_BLOCK:
                async with self._blockwise:  # the wait for the lock is not the timeout's
                    resp = await asyncio.wait_for(self._request(msg), timeout)
            else:
                resp = await asyncio.wait_for(self._request(msg), timeout)
        except TimeoutError as exc:
            # wait_for cancelled the response future: aiocoap stops retransmitting
            raise TransportError(f"CoAP request timed out after {timeout:.1f}s",
                                 batch_id=batch_id) from exc
        except aiocoap.error.Error as exc:
            raise self._failed(f"CoAP request to {self._base} failed: {_cause(exc)}",
                               batch_id) from exc
        except OSError as exc:
            raise self._failed(f"CoAP socket error: {exc}", batch_id) from exc
        if self._last_error:
            log.warning("CoAP uplink reaches %s again", self._base)
            self._last_error = ""
        return _ack_from_response(resp, batch_id)

    async def _request(self, msg: Message) -> Message:
        if self._ctx is None:
            raise TransportError("CoAP uplink closed")
        resp: Message = await self._ctx.request(msg).response
        return resp

    def _failed(self, message: str, batch_id: str) -> TransportError:
        if message != self._last_error:  # once per distinct failure, not per retry
            self._last_error = message
            log.warning("%s (retrying with backoff)", message)
        return TransportError(message, batch_id=batch_id)

    async def close(self) -> None:
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            await ctx.shutdown()


def _cause(exc: BaseException) -> str:
    """aiocoap says ``Network error: NetworkError``; the useful text (``[Errno 111]
    Connection refused``) is in its args or its cause."""
    for e in (exc, exc.__cause__):
        if e is not None and e.args and str(e.args[0]) not in ("", type(e).__name__):
            return str(e.args[0])
    return str(exc) or type(exc).__name__


def _ack_from_response(resp: Message, batch_id: str) -> Ack:
    code = resp.code
    if code == Code.SERVICE_UNAVAILABLE:
        max_age = resp.opt.max_age
        raise ThrottledError("CoAP 5.03 from ingest",
                             retry_after_s=float(max_age if max_age is not None else 60),
                             batch_id=batch_id)
    try:
        ack = decode_ack(resp.payload) if resp.payload else None
    except DecodeError as exc:
        raise TransportError(f"CoAP response {code} has no valid ack", batch_id=batch_id) from exc
    if code.is_successful() and ack is not None:
        return ack
    if code == Code.BAD_REQUEST or code == Code.REQUEST_ENTITY_TOO_LARGE or code == Code.FORBIDDEN:
        raise PayloadRejected(f"ingest rejected batch: {ack.reason if ack else code}",
                              reason=ack.reason if ack and ack.reason else "rejected",
                              batch_id=batch_id,
                              dead_lettered=bool(ack is not None and ack.dead_lettered), ack=ack)
    raise TransportError(f"CoAP ingest answered {code}", batch_id=batch_id)


class _IngestResource(aiocoap.resource.Resource):  # type: ignore[misc]
    """``/ingest`` (no channel identity) or, as a sub-site, ``/ingest/<device_id>``."""

    def __init__(self, handler: IngestHandler) -> None:
        super().__init__()
        self._handler = handler

    async def render_post(self, request: Message) -> Message:
        path = request.opt.uri_path
        if len(path) > 1:
            return Message(code=Code.NOT_FOUND)
        device = path[0] if path and path[0] else None
        try:
            ack = await self._handler(Incoming(bytes(request.payload), "coap", device,
                                               f"coap {_peer_of(request)}"))
        except Exception:  # a handler bug answers 5.00, it must not kill the server
            log.exception("CoAP ingest handler failed")
            return Message(code=Code.INTERNAL_SERVER_ERROR)
        return response_for(ack)


class _DeviceIngest(_IngestResource, aiocoap.resource.PathCapable):  # type: ignore[misc]
    pass


def _peer_of(request: Message) -> str:
    try:
        return str(request.remote.hostinfo)
    except Exception:  # an unusual remote (e.g. a test double) has no hostinfo
        return "?"


def response_for(ack: Ack) -> Message:
    """Map an Ack onto the CoAP response code users and peers expect."""
    body = encode_ack(ack)
    if ack.status in ("ok", "duplicate", "conflict"):
        return Message(code=Code.CHANGED, payload=body)
    if ack.status == "throttled":
        m = Message(code=Code.SERVICE_UNAVAILABLE, payload=body)
        m.opt.max_age = max(1, math.ceil(ack.retry_after_s))  # never invite an early retry
        return m
    if ack.status == "rejected":
        return Message(code=Code.BAD_REQUEST, payload=body)
    return Message(code=Code.INTERNAL_SERVER_ERROR, payload=body)


def _site(handler: IngestHandler, path: str = "ingest") -> aiocoap.resource.Site:
    site = aiocoap.resource.Site()
    # /<path> (no channel identity) is a plain resource; /<path>/<device_id> goes to the
    # PathCapable one (aiocoap keeps them apart: resources vs. sub-sites)
    site.add_resource((path,), _IngestResource(handler))
    site.add_resource((path,), _DeviceIngest(handler))
    return site


class CoapIngestServer:
    """Cloud-side CoAP endpoint."""

    name = "coap"

    def __init__(self, host: str = "127.0.0.1", port: int = 5683, *,
                 path: str = "ingest") -> None:
        self.host = host
        self.port = port
        self.path = path.strip("/")
        self._ctx: aiocoap.Context | None = None

    async def start(self, handler: IngestHandler) -> None:
        """Bind ``coap://host:port/<path>[/<device_id>]`` and serve until :meth:`stop`.

        aiocoap binds with SO_REUSEADDR, so a second server on a busy UDP port would start
        and split the traffic with the first: an exclusive probe bind refuses it first.
        """
        try:
            _probe_udp_port(self.host, self.port)
            self._ctx = await aiocoap.Context.create_server_context(
                _site(handler, self.path), bind=(self.host, self.port))
        except OSError as exc:
            busy = exc.errno == errno.EADDRINUSE
            hint = ("; is another pymigrate cloud/run using it? Stop it or choose another port"
                    if busy else "")
            raise TransportError(
                f"cannot listen for CoAP on {self.host}:{self.port} (UDP): "
                f"{exc.strerror or exc}{hint}",
                reason="address_in_use" if busy else "bind", retriable=False,
                port=self.port, host=self.host,
                bad_key="port" if busy or exc.errno == errno.EACCES else "host") from exc

    async def stop(self) -> None:
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            await ctx.shutdown()


def _probe_udp_port(host: str, port: int) -> None:
    """Raise OSError (EADDRINUSE) when a UDP socket is already bound to ``host:port``."""
    if not port:
        return
    for family, type_, proto, _, addr in socket.getaddrinfo(host, port,
                                                             type=socket.SOCK_DGRAM)[:1]:
        with socket.socket(family, type_, proto) as probe:  # no SO_REUSEADDR: exclusive
            probe.bind(addr)


def parse_coap_uri(uri: str) -> tuple[str, int]:
    """(host, port) of a ``coap://`` URI (default port 5683)."""
    u = urlsplit(uri)
    return (u.hostname or "127.0.0.1", u.port or 5683)
