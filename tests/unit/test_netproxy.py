"""The fault proxy against in-process echo servers on loopback (fast, no brokers)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator

import pytest

from pymigrate.clock import VirtualClock
from simulators.netproxy import FaultProxy, Faults, TokenBucket, UdpFaultProxy


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.t.sendto(data, addr)  # type: ignore[attr-defined]


class _UdpClient(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.got: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.got.put_nowait(data)


@pytest.fixture
async def udp_echo_port() -> AsyncIterator[int]:
    loop = asyncio.get_running_loop()
    t, _ = await loop.create_datagram_endpoint(_UdpEcho, local_addr=("127.0.0.1", 0))
    yield t.get_extra_info("sockname")[1]
    t.close()


async def _roundtrip(port: int, data: bytes, timeout: float = 2.0) -> bytes:  # noqa: ASYNC109
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        w.write(data)
        await w.drain()
        return await asyncio.wait_for(r.readexactly(len(data)), timeout)
    finally:
        w.close()


async def test_tcp_forwards_and_counts(echo_port: int) -> None:
    async with FaultProxy(("127.0.0.1", echo_port)) as p:
        data = bytes(range(256)) * 40
        assert await _roundtrip(p.port(), data) == data
        await asyncio.sleep(0.05)
        c = p.counters()
        assert c.bytes_up == len(data) and c.bytes_down == len(data)
        assert c.bytes_total == 2 * len(data) and c.connections == 1
        p.reset_counters()
        assert p.counters().bytes_total == 0


async def test_tcp_latency_and_jitter(echo_port: int) -> None:
    async with FaultProxy(("127.0.0.1", echo_port), rng=random.Random(1)) as p:
        p.set(latency_ms=60, jitter_ms=20)
        assert p.faults().latency_ms == 60
        t0 = time.monotonic()
        assert await _roundtrip(p.port(), b"ping") == b"ping"
        assert time.monotonic() - t0 >= 0.12  # one-way latency, both directions


async def test_tcp_bandwidth_cap(echo_port: int) -> None:
    async with FaultProxy(("127.0.0.1", echo_port)) as p:
        p.set(bandwidth_bps=4_000_000, burst_bytes=16_384)  # 500 kB/s
        data = b"x" * 120_000
        t0 = time.monotonic()
        assert await _roundtrip(p.port(), data, timeout=5) == data
        # (120 kB - burst) / 500 kB/s at least once per direction
        assert time.monotonic() - t0 >= 0.2


async def test_tcp_loss_stalls_but_keeps_bytes(echo_port: int) -> None:
    async with FaultProxy(("127.0.0.1", echo_port)) as p:
        p.set(loss=1.0, stall_ms=80)
        t0 = time.monotonic()
        assert await _roundtrip(p.port(), b"abc") == b"abc"
        assert time.monotonic() - t0 >= 0.16
        assert p.counters().stalled >= 2


async def test_tcp_reset_fault(echo_port: int) -> None:
    async with FaultProxy(("127.0.0.1", echo_port)) as p:
        p.set(reset_prob=1.0)
        r, w = await asyncio.open_connection("127.0.0.1", p.port())
        w.write(b"hello")
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(r.readexactly(5), 2)
        w.close()
        assert p.counters().resets == 1


async def test_cut_reset_then_restore(echo_port: int) -> None:
    async with FaultProxy(("127.0.0.1", echo_port)) as p:
        r, w = await asyncio.open_connection("127.0.0.1", p.port())
        w.write(b"1")
        assert await r.readexactly(1) == b"1"
        assert p.active_connections() == 1
        p.cut(mode="reset")
        assert p.is_cut()
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(r.readexactly(1), 2)
        w.close()
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await _roundtrip(p.port(), b"2")  # refused while cut
        assert p.counters().refused == 1
        p.restore()
        assert not p.is_cut()
        assert await _roundtrip(p.port(), b"3") == b"3"


async def test_blackhole_holds_without_closing(echo_port: int) -> None:
    async with FaultProxy(("127.0.0.1", echo_port)) as p:
        r, w = await asyncio.open_connection("127.0.0.1", p.port())
        p.cut(mode="blackhole")
        w.write(b"held")
        await w.drain()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(r.readexactly(4), 0.3)
        assert p.active_connections() == 1  # half-open: nothing closed
        p.restore()
        assert await asyncio.wait_for(r.readexactly(4), 2) == b"held"
        w.close()


async def test_groups_partition_independently(echo_port: int) -> None:
    async with FaultProxy(("127.0.0.1", echo_port), groups=("east", "west")) as p:
        assert p.port("east") != p.port("west")
        p.cut("east")
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await _roundtrip(p.port("east"), b"e")
        assert await _roundtrip(p.port("west"), b"w") == b"w"
        assert p.counters("east").refused == 1 and p.counters("west").refused == 0
        with pytest.raises(KeyError):
            p.set("north", loss=0.1)


async def test_validation_and_loopback_only() -> None:
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy(("10.1.2.3", 1883))
    with pytest.raises(ValueError, match="loopback"):
        UdpFaultProxy(("127.0.0.1", 5683), listen_host="0.0.0.0")
    with pytest.raises(ValueError):
        FaultProxy(("localhost", 1), groups=())
    p = FaultProxy(("::1", 1883))
    with pytest.raises(ValueError):
        p.set(loss=1.5)
    with pytest.raises(ValueError):
        p.set(latency_ms=-1)
    with pytest.raises(ValueError):
        p.cut(mode="explode")
    with pytest.raises(ValueError):
        Faults(burst_bytes=0).validate()
    with pytest.raises(ValueError):
        p.connectivity_windows(10, 20)


async def test_schedule_outage_on_virtual_clock() -> None:
    clock = VirtualClock()
    p = FaultProxy(("127.0.0.1", 1), clock=clock)
    p.schedule_outage(5, 3, mode="blackhole")
    await clock.advance(4.9)
    assert not p.is_cut()
    await clock.advance(0.2)
    assert p.is_cut()
    await clock.advance(3)
    assert not p.is_cut()
    await p.close()


async def test_connectivity_windows_on_virtual_clock() -> None:
    clock = VirtualClock()
    p = FaultProxy(("127.0.0.1", 1), clock=clock)
    p.connectivity_windows(60, 10, cycles=2)
    states = []
    for _ in range(14):
        await clock.advance(10)
        states.append(p.is_cut())
    # open 0-10, cut 10-60, open 60-70, cut 70-120, then restored for good
    assert states[:6] == [True] * 5 + [False]
    assert states[6:12] == [True] * 5 + [False]
    assert states[12:] == [False, False]
    await p.close()


async def test_token_bucket_math() -> None:
    clock = VirtualClock()
    b = TokenBucket(clock, rate_bps=8000, burst_bytes=1000)  # 1000 B/s
    assert b.delay(1000) == 0.0
    assert b.delay(500) == pytest.approx(0.5)
    await clock.advance(1.0)
    assert b.delay(400) == pytest.approx(0.0)
    assert TokenBucket(clock, 0, 10).delay(10**6) == 0.0


async def _udp_client(port: int) -> tuple[asyncio.DatagramTransport, _UdpClient]:
    loop = asyncio.get_running_loop()
    t, proto = await loop.create_datagram_endpoint(_UdpClient, remote_addr=("127.0.0.1", port))
    return t, proto


async def test_udp_forwards_delays_and_counts(udp_echo_port: int) -> None:
    async with UdpFaultProxy(("127.0.0.1", udp_echo_port)) as p:
        t, c = await _udp_client(p.port())
        t.sendto(b"one")
        assert await asyncio.wait_for(c.got.get(), 2) == b"one"
        p.set(latency_ms=50, bandwidth_bps=1_000_000)
        t0 = time.monotonic()
        t.sendto(b"two")
        assert await asyncio.wait_for(c.got.get(), 2) == b"two"
        assert time.monotonic() - t0 >= 0.1
        cnt = p.counters()
        assert cnt.bytes_up == 6 and cnt.bytes_down == 6 and cnt.connections == 1
        t.close()


async def test_udp_loss_and_cut_drop(udp_echo_port: int) -> None:
    async with UdpFaultProxy(("127.0.0.1", udp_echo_port)) as p:
        t, c = await _udp_client(p.port())
        t.sendto(b"warm")
        assert await asyncio.wait_for(c.got.get(), 2) == b"warm"
        p.set(loss=1.0)
        for _ in range(5):
            t.sendto(b"lost")
        await asyncio.sleep(0.1)
        assert c.got.empty() and p.counters().dropped == 5
        p.set(loss=0.0)
        p.cut()
        t.sendto(b"cut")
        await asyncio.sleep(0.1)
        assert c.got.empty() and p.counters().dropped == 6
        p.restore()
        t.sendto(b"back")
        assert await asyncio.wait_for(c.got.get(), 2) == b"back"
        t.close()


async def test_udp_peers_are_bounded(udp_echo_port: int) -> None:
    async with UdpFaultProxy(("127.0.0.1", udp_echo_port), max_conns=1) as p:
        clients = [await _udp_client(p.port()) for _ in range(3)]
        for i, (t, c) in enumerate(clients):
            t.sendto(f"c{i}".encode())
            assert await asyncio.wait_for(c.got.get(), 2) == f"c{i}".encode()
        assert p.counters().connections == 3
        assert len(p._peers) == 1  # least recently used peers were dropped
        for t, _ in clients:
            t.close()
