"""Fault-injecting asyncio proxies (TCP and UDP) between a client and a real server.

For tests and benchmarks against real brokers on loopback: both ends must be loopback
addresses. Each proxy has one or more *groups*, each a listening port with its own
faults, so devices pointed at different ports form groups that can be partitioned
independently. Faults (:class:`Faults`, changed at run time with :meth:`set`):

- ``latency_ms`` + uniform ``jitter_ms`` per chunk/datagram (TCP keeps byte order: a
  chunk is never released before the one ahead of it);
- ``loss``: UDP drops the datagram; TCP cannot lose bytes, so a "lost" segment is held
  back ``stall_ms`` (the retransmission timeout the sender would pay);
- ``reset_prob``: per TCP chunk, the connection is reset (RST both ways);
- ``bandwidth_bps``: token bucket per group and direction (``burst_bytes``);
- :meth:`cut` ``mode="reset"``: existing connections reset, new ones refused (UDP: all
  dropped); ``mode="blackhole"``: nothing forwarded, nothing closed (half-open: the
  client notices only by its own timeouts), data resumes on :meth:`restore`;
- :meth:`schedule_outage` and :meth:`connectivity_windows`: timed cuts on the injected
  clock (sleeps to computed deadlines, no polling).

Counters (:class:`Counters`, per group) give bytes forwarded each way, for protocol
overhead figures. Bounded: at most ``max_conns`` TCP connections / UDP peers per group and
``max_queue`` chunks queued per direction (a full queue stops reading: backpressure).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import ipaddress
import logging
import random
import socket
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from pymigrate.clock import Clock, WallClock

__all__ = ["Counters", "FaultProxy", "Faults", "TokenBucket", "UdpFaultProxy"]

log = logging.getLogger(__name__)

_CHUNK = 64 * 1024


@dataclasses.dataclass
class Faults:
    """The faults of one group (mutable; change them with ``proxy.set(...)``)."""

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    stall_ms: float = 200.0
    reset_prob: float = 0.0
    bandwidth_bps: float = 0.0  # 0 = unlimited
    burst_bytes: int = 16 * 1024

    def validate(self) -> None:
        for name in ("loss", "reset_prob"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        for name in ("latency_ms", "jitter_ms", "stall_ms", "bandwidth_bps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.burst_bytes <= 0:
            raise ValueError("burst_bytes must be > 0")


@dataclasses.dataclass
class Counters:
    """What one group forwarded and broke."""

    bytes_up: int = 0  # client -> server, forwarded
    bytes_down: int = 0  # server -> client, forwarded
    chunks_up: int = 0
    chunks_down: int = 0
    dropped: int = 0  # datagrams lost or blackholed (UDP), chunks discarded by a reset
    stalled: int = 0  # TCP chunks held back by "loss"
    resets: int = 0  # connections reset by a fault or a cut
    refused: int = 0  # connections refused while cut
    connections: int = 0  # accepted TCP connections / UDP peers seen

    @property
    def bytes_total(self) -> int:
        return self.bytes_up + self.bytes_down


class TokenBucket:
    """Token bucket on a clock: ``delay(n)`` says how long ``n`` bytes must wait."""

    def __init__(self, clock: Clock, rate_bps: float, burst_bytes: int) -> None:
        self.clock = clock
        self.rate = rate_bps / 8.0  # bytes per second
        self.burst = float(burst_bytes)
        self.tokens = float(burst_bytes)
        self.t = clock.monotonic()

    def delay(self, n: int) -> float:
        """Take ``n`` tokens (going into debt) and return the wait before sending."""
        if self.rate <= 0:
            return 0.0
        now = self.clock.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


def _check_loopback(host: str, what: str) -> None:
    if host == "localhost":
        return
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{what} {host!r} is not a loopback address (the proxy is for tests)")


class _Group:
    """One listening port with its faults, counters, cut state and buckets."""

    def __init__(self, name: str, clock: Clock) -> None:
        self.name = name
        self.clock = clock
        self.faults = Faults()
        self.counters = Counters()
        self.mode = ""  # "", "reset" or "blackhole"
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.buckets: dict[str, TokenBucket] = {}
        self.port = 0

    def bucket(self, direction: str) -> TokenBucket | None:
        f = self.faults
        if f.bandwidth_bps <= 0:
            return None
        b = self.buckets.get(direction)
        if b is None or b.rate != f.bandwidth_bps / 8.0 or b.burst != f.burst_bytes:
            b = self.buckets[direction] = TokenBucket(self.clock, f.bandwidth_bps,
                                                      f.burst_bytes)
        return b


class _ProxyBase:
    """Groups, run-time control and schedules shared by the TCP and UDP proxies."""

    def __init__(self, upstream: tuple[str, int], *, groups: Iterable[str] = ("default",),
                 listen_host: str = "127.0.0.1", clock: Clock | None = None,
                 rng: random.Random | None = None, max_conns: int = 256,
                 max_queue: int = 64) -> None:
        _check_loopback(upstream[0], "upstream")
        _check_loopback(listen_host, "listen host")
        self.upstream = upstream
        self.listen_host = listen_host
        self.clock = clock or WallClock()
        self.rng = rng or random.Random()
        self.max_conns = max_conns
        self.max_queue = max_queue
        self.groups = {name: _Group(name, self.clock) for name in groups}
        if not self.groups:
            raise ValueError("at least one group")
        self._timers: set[asyncio.Task[None]] = set()
        self._setup()

    def _setup(self) -> None:
        """Per-kind state (TCP connections, UDP peers)."""

    def _select(self, group: str | None) -> list[_Group]:
        if group is None:
            return list(self.groups.values())
        try:
            return [self.groups[group]]
        except KeyError:
            raise KeyError(f"no group {group!r} (have {', '.join(self.groups)})") from None

    def port(self, group: str = "default") -> int:
        """The listening port of ``group`` (after :meth:`start`)."""
        return self._select(group)[0].port

    def counters(self, group: str | None = None) -> Counters:
        """Counters of one group, or summed over all."""
        out = Counters()
        for g in self._select(group):
            for f in dataclasses.fields(Counters):
                setattr(out, f.name, getattr(out, f.name) + getattr(g.counters, f.name))
        return out

    def reset_counters(self) -> None:
        for g in self.groups.values():
            g.counters = Counters()

    def faults(self, group: str = "default") -> Faults:
        return dataclasses.replace(self._select(group)[0].faults)

    def set(self, group: str | None = None, **faults: float) -> None:
        """Change faults at run time, e.g. ``set(loss=0.1, latency_ms=50)``."""
        for g in self._select(group):
            new = dataclasses.replace(g.faults, **faults)  # type: ignore[arg-type]
            new.validate()
            g.faults = new

    def cut(self, group: str | None = None, *, mode: str = "reset") -> None:
        """Partition ``group`` (or all): ``reset`` connections or ``blackhole`` them."""
        if mode not in ("reset", "blackhole"):
            raise ValueError(f"mode must be 'reset' or 'blackhole', got {mode!r}")
        for g in self._select(group):
            g.mode = mode
            g.flowing.clear()
            if mode == "reset":
                self._reset_group(g)

    def restore(self, group: str | None = None) -> None:
        """Heal the partition: forwarding resumes (blackholed data flows on)."""
        for g in self._select(group):
            g.mode = ""
            g.flowing.set()

    def is_cut(self, group: str = "default") -> bool:
        return bool(self._select(group)[0].mode)

    def _reset_group(self, g: _Group) -> None:  # pragma: no cover - overridden
        pass

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._timers.add(task)
        task.add_done_callback(self._timers.discard)

    def schedule_outage(self, start_in_s: float, duration_s: float, *,
                        group: str | None = None, mode: str = "reset") -> None:
        """Cut ``group`` after ``start_in_s`` for ``duration_s`` (on the injected clock)."""
        async def run() -> None:
            await self.clock.sleep(start_in_s)
            self.cut(group, mode=mode)
            await self.clock.sleep(duration_s)
            self.restore(group)
        self._spawn(run())

    def connectivity_windows(self, period_s: float, open_s: float, *,
                             group: str | None = None, mode: str = "reset",
                             cycles: int | None = None) -> None:
        """Link up for ``open_s`` at the start of every ``period_s`` (a satellite or
        cellular slot), cut the rest of the period; ``cycles`` bounds the schedule."""
        if not 0 < open_s <= period_s:
            raise ValueError("need 0 < open_s <= period_s")

        async def run() -> None:
            start = self.clock.monotonic()
            n = 0
            while cycles is None or n < cycles:
                self.restore(group)
                await self.clock.sleep_until(start + n * period_s + open_s)
                if open_s < period_s:
                    self.cut(group, mode=mode)
                n += 1
                await self.clock.sleep_until(start + n * period_s)
            self.restore(group)
        self._spawn(run())

    async def _stop_timers(self) -> None:
        for t in list(self._timers):
            t.cancel()
        for t in list(self._timers):
            with contextlib.suppress(asyncio.CancelledError):
                await t


class _Pipe:
    """One direction of one TCP connection: read, apply faults, release in order."""

    def __init__(self, proxy: FaultProxy, group: _Group, conn: _Conn, direction: str,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.group = group
        self.conn = conn
        self.direction = direction
        self.reader = reader
        self.writer = writer
        self.queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(proxy.max_queue)
        self.last_release = 0.0

    async def read_loop(self) -> None:
        g, clock, rng = self.group, self.proxy.clock, self.proxy.rng
        try:
            while True:
                data = await self.reader.read(_CHUNK)
                if not data:
                    break
                f = g.faults
                if f.reset_prob and rng.random() < f.reset_prob:
                    g.counters.dropped += 1
                    self.conn.reset()
                    return
                delay = f.latency_ms / 1000.0
                if f.jitter_ms:
                    delay += rng.uniform(0.0, f.jitter_ms / 1000.0)
                if f.loss and rng.random() < f.loss:
                    g.counters.stalled += 1
                    delay += f.stall_ms / 1000.0
                bucket = g.bucket(self.direction)
                if bucket is not None:
                    delay += bucket.delay(len(data))
                release = max(self.last_release, clock.monotonic() + delay)
                self.last_release = release
                await self.queue.put((release, data))
        except (ConnectionError, OSError):
            pass
        await self.queue.put(None)

    async def write_loop(self) -> None:
        g, clock = self.group, self.proxy.clock
        try:
            while True:
                item = await self.queue.get()
                if item is None:
                    if self.writer.can_write_eof():
                        self.writer.write_eof()
                    return
                release, data = item
                await clock.sleep_until(release)
                await g.flowing.wait()  # blackhole: hold, do not close
                self.writer.write(data)
                await self.writer.drain()
                if self.direction == "up":
                    g.counters.bytes_up += len(data)
                    g.counters.chunks_up += 1
                else:
                    g.counters.bytes_down += len(data)
                    g.counters.chunks_down += 1
        except (ConnectionError, OSError):
            self.conn.reset()


class _Conn:
    """A proxied TCP connection: two pipes and their four tasks."""

    def __init__(self, proxy: FaultProxy, group: _Group) -> None:
        self.proxy = proxy
        self.group = group
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.done = False

    def reset(self) -> None:
        """RST both sides (abort, no FIN) and stop the pipes."""
        if self.done:
            return
        self.done = True
        self.group.counters.resets += 1
        for w in self.writers:
            sock = w.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    # linger 0: close sends RST, like a middlebox dropping state
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    b"\x01\x00\x00\x00\x00\x00\x00\x00")
            w.transport.abort()
        current = asyncio.current_task()
        for t in self.tasks:
            if t is not current:
                t.cancel()


class FaultProxy(_ProxyBase):
    """Fault-injecting TCP proxy (see module doc). ``await start()``, ``await close()``."""

    def _setup(self) -> None:
        self._servers: list[asyncio.Server] = []
        self._conns: dict[str, set[_Conn]] = {g: set() for g in self.groups}

    async def start(self) -> None:
        """Listen on one free loopback port per group."""
        for g in self.groups.values():
            server = await asyncio.start_server(
                functools.partial(self._accept, g), self.listen_host, 0)
            g.port = server.sockets[0].getsockname()[1]
            self._servers.append(server)

    async def _accept(self, g: _Group, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        conns = self._conns[g.name]
        if g.mode == "reset" or len(conns) >= self.max_conns:
            g.counters.refused += 1
            writer.transport.abort()
            return
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            g.counters.refused += 1
            writer.transport.abort()
            return
        g.counters.connections += 1
        conn = _Conn(self, g)
        conn.writers = [writer, up_w]
        for s in (writer, up_w):
            sock = s.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        up = _Pipe(self, g, conn, "up", reader, up_w)
        down = _Pipe(self, g, conn, "down", up_r, writer)
        conns.add(conn)
        conn.tasks = [asyncio.create_task(c) for c in
                      (up.read_loop(), up.write_loop(), down.read_loop(), down.write_loop())]
        try:
            await asyncio.gather(*conn.tasks, return_exceptions=True)
        finally:
            conns.discard(conn)
            for w in conn.writers:
                w.close()

    def _reset_group(self, g: _Group) -> None:
        for conn in list(self._conns[g.name]):
            conn.reset()

    def active_connections(self, group: str | None = None) -> int:
        return sum(len(self._conns[g.name]) for g in self._select(group))

    async def close(self) -> None:
        """Stop listening, reset every connection, cancel schedules."""
        await self._stop_timers()
        for s in self._servers:
            s.close()
        for g in self.groups.values():
            for conn in list(self._conns[g.name]):
                conn.reset()
        for s in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(s.wait_closed(), 1.0)
        self._servers.clear()

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class _UdpListen(asyncio.DatagramProtocol):
    def __init__(self, proxy: UdpFaultProxy, group: _Group) -> None:
        self.proxy = proxy
        self.group = group
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.proxy._from_client(self, data, addr)


class _UdpUpstream(asyncio.DatagramProtocol):
    def __init__(self, proxy: UdpFaultProxy, listen: _UdpListen, client: tuple[str, int]) -> None:
        self.proxy = proxy
        self.listen = listen
        self.client = client
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.proxy._from_server(self, data)


class UdpFaultProxy(_ProxyBase):
    """Fault-injecting UDP proxy: one upstream socket per client address (bounded, LRU).

    Datagrams are delayed independently (jitter reorders them, as on a real path).
    """

    def _setup(self) -> None:
        self._listeners: list[_UdpListen] = []
        self._peers: OrderedDict[tuple[str, tuple[str, int]], _UdpUpstream] = OrderedDict()
        self._pending: set[asyncio.TimerHandle] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for g in self.groups.values():
            _, proto = await loop.create_datagram_endpoint(
                functools.partial(_UdpListen, self, g), local_addr=(self.listen_host, 0))
            assert proto.transport is not None
            g.port = proto.transport.get_extra_info("sockname")[1]
            self._listeners.append(proto)

    def _fate(self, g: _Group, n: int) -> float | None:
        """Delay for a datagram of ``n`` bytes, or None when it is lost."""
        f = g.faults
        if g.mode or (f.loss and self.rng.random() < f.loss):
            g.counters.dropped += 1
            return None
        delay = f.latency_ms / 1000.0
        if f.jitter_ms:
            delay += self.rng.uniform(0.0, f.jitter_ms / 1000.0)
        return delay

    def _later(self, delay: float, fn: Callable[[], None]) -> None:
        if delay <= 0:
            fn()
            return
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle

        def fire() -> None:
            self._pending.discard(handle)
            fn()
        handle = loop.call_later(delay, fire)
        self._pending.add(handle)

    def _from_client(self, listen: _UdpListen, data: bytes, addr: tuple[str, int]) -> None:
        g = listen.group
        key = (g.name, addr)
        peer = self._peers.get(key)
        if peer is None:
            self._spawn(self._open_peer(listen, addr, data))
            return
        self._peers.move_to_end(key)
        self._forward_up(g, peer, data)

    def _forward_up(self, g: _Group, peer: _UdpUpstream, data: bytes) -> None:
        delay = self._fate(g, len(data))
        if delay is None:
            return
        bucket = g.bucket("up")
        if bucket is not None:
            delay += bucket.delay(len(data))

        def send() -> None:
            if peer.transport is not None and not peer.transport.is_closing():
                peer.transport.sendto(data)
                g.counters.bytes_up += len(data)
                g.counters.chunks_up += 1
        self._later(delay, send)

    async def _open_peer(self, listen: _UdpListen, addr: tuple[str, int], first: bytes) -> None:
        g = listen.group
        key = (g.name, addr)
        if key not in self._peers:
            loop = asyncio.get_running_loop()
            _, peer = await loop.create_datagram_endpoint(
                lambda: _UdpUpstream(self, listen, addr), remote_addr=self.upstream)
            if key in self._peers:  # raced with another first datagram
                assert peer.transport is not None
                peer.transport.close()
            else:
                self._peers[key] = peer
                g.counters.connections += 1
                while len(self._peers) > self.max_conns:
                    _, old = self._peers.popitem(last=False)
                    if old.transport is not None:
                        old.transport.close()
        self._forward_up(g, self._peers[key], first)

    def _from_server(self, peer: _UdpUpstream, data: bytes) -> None:
        g = peer.listen.group
        delay = self._fate(g, len(data))
        if delay is None:
            return
        bucket = g.bucket("down")
        if bucket is not None:
            delay += bucket.delay(len(data))

        def send() -> None:
            t = peer.listen.transport
            if t is not None and not t.is_closing():
                t.sendto(data, peer.client)
                g.counters.bytes_down += len(data)
                g.counters.chunks_down += 1
        self._later(delay, send)

    async def close(self) -> None:
        await self._stop_timers()
        for h in list(self._pending):
            h.cancel()
        self._pending.clear()
        for peer in self._peers.values():
            if peer.transport is not None:
                peer.transport.close()
        self._peers.clear()
        for listen in self._listeners:
            if listen.transport is not None:
                listen.transport.close()
        self._listeners.clear()

    async def __aenter__(self) -> UdpFaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
