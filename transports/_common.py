"""Pieces every transport shares: the Ack -> error mapping, per-device ordering, TLS."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator

from pymigrate.clock import Clock
from pymigrate.errors import ConfigError, PayloadRejected, ThrottledError, TransportError
from pymigrate.types import Ack


def check_ack(ack: Ack, batch_id: str, transport: str) -> Ack:
    """Return an ``ok``/``duplicate``/``conflict`` ack; turn every other status into the
    typed error.

    ``throttled`` -> :class:`ThrottledError` (with the server's retry-after),
    ``rejected`` -> :class:`PayloadRejected`, ``error`` or unknown -> retriable
    :class:`TransportError` (the device keeps the data and resends).
    """
    if ack.status in ("ok", "duplicate", "conflict"):
        return ack
    if ack.status == "throttled":
        raise ThrottledError(f"{transport} ingest throttled batch {batch_id}",
                             retry_after_s=max(0.0, ack.retry_after_s) or 1.0,
                             batch_id=batch_id, transport=transport)
    if ack.status == "rejected":
        raise PayloadRejected(f"{transport} ingest rejected batch {batch_id}: {ack.reason}",
                              reason=ack.reason or "rejected", batch_id=batch_id,
                              transport=transport, dead_lettered=ack.dead_lettered, ack=ack)
    raise TransportError(f"{transport} ingest answered {ack.status!r} ({ack.reason})",
                         batch_id=batch_id, transport=transport)


def transport_ack(batch_id: str, t_ms: int) -> Ack:
    """The ack of the weaker transport-only mode (PUBACK / publisher confirm).

    ``reason="transport"`` tells the caller the cloud has not committed anything yet;
    server times are the local time (no clock sample to take from it).
    """
    return Ack(batch_id=batch_id, status="ok", t_recv_ms=t_ms, t_send_ms=t_ms,
               reason="transport")


class KeyedLocks:
    """One FIFO lock per key (device), dropped when nobody holds or waits on it.

    The cloud side handles batches of different devices concurrently but one device's
    batches in arrival order, so a device's seqs reach the store in order.
    """

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        entry = self._locks.get(key)
        if entry is None:
            entry = self._locks[key] = (asyncio.Lock(), [0])
        lock, users = entry
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                self._locks.pop(key, None)

    def __len__(self) -> int:
        return len(self._locks)


def client_tls_context(section: str, ca_file: str, cert_file: str, key_file: str,
                       *, verify_hostname: bool = True) -> ssl.SSLContext:
    """A client TLS context from PEM files (``ca_file`` empty = system trust store).

    File problems are :class:`ConfigError` naming ``<section>.<key>``.
    """
    try:
        ctx = ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{section}.ca_file", f"cannot load CA {ca_file!r}: {exc}") from exc
    ctx.check_hostname = verify_hostname
    if cert_file:
        try:
            ctx.load_cert_chain(cert_file, key_file or None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{section}.cert_file",
                              f"cannot load client certificate {cert_file!r}: {exc}") from exc
    return ctx


class AckWaiters:
    """End-to-end acks by correlation (batch id): the send side registers and waits, the
    receive side resolves; acks nobody waits for any more are counted as stale."""

    def __init__(self) -> None:
        self._futs: dict[str, asyncio.Future[Ack]] = {}
        self.stale = 0

    def register(self, batch_id: str) -> asyncio.Future[Ack]:
        """The future for ``batch_id`` (a pending one is reused: a retried send of the
        same batch may be answered by the ack of the earlier attempt)."""
        fut = self._futs.get(batch_id)
        if fut is None or fut.done():
            fut = self._futs[batch_id] = asyncio.get_running_loop().create_future()
        return fut

    def resolve(self, batch_id: str, ack: Ack) -> None:
        fut = self._futs.get(batch_id)
        if fut is None or fut.done():
            self.stale += 1
            return
        fut.set_result(ack)

    def fail_all(self, exc: BaseException) -> None:
        for fut in self._futs.values():
            if not fut.done():
                fut.set_exception(exc)

    async def wait(self, fut: asyncio.Future[Ack], deadline: float, clock: Clock) -> Ack:
        """The ack, or TimeoutError at ``deadline`` (monotonic, on ``clock``)."""
        return await asyncio.wait_for(asyncio.shield(fut),
                                      max(0.0, deadline - clock.monotonic()))

    def discard(self, batch_id: str, fut: asyncio.Future[Ack] | None) -> None:
        if fut is not None and self._futs.get(batch_id) is fut:
            del self._futs[batch_id]
            if fut.done() and not fut.cancelled():
                fut.exception()  # retrieved: no "never retrieved" warning
