"""sd_notify: environment parsing, datagram format, and the watchdog only while alive."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.sdnotify import Notifier


@pytest.fixture
def rx(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.setblocking(False)
    yield path, s
    s.close()


def _drain(s: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(s.recv(4096).decode())
        except BlockingIOError:
            return out


def test_from_env() -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": "/run/n", "WATCHDOG_USEC": "30000000"})
    assert n.enabled and n.address == "/run/n" and n.watchdog_s == 30.0
    assert Notifier.from_env({}).enabled is False
    other = Notifier.from_env({"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "1000000",
                               "WATCHDOG_PID": str(os.getpid() + 1)})
    assert other.watchdog_s is None  # the watchdog belongs to another process
    mine = Notifier.from_env({"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "1000000",
                              "WATCHDOG_PID": str(os.getpid())})
    assert mine.watchdog_s == 1.0
    assert Notifier.from_env({"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "x"}).watchdog_s is None


def test_messages_on_the_wire(rx: tuple[str, socket.socket]) -> None:
    path, s = rx
    n = Notifier(path)
    assert n.ready("running") and n.watchdog("accepted=3") and n.stopping() and n.status("hi")
    assert _drain(s) == [f"READY=1\nSTATUS=running\nMAINPID={os.getpid()}",
                         "WATCHDOG=1\nSTATUS=accepted=3", "STOPPING=1\nSTATUS=stopping: draining",
                         "STATUS=hi"]


def test_disabled_and_failing_sends_are_not_fatal(tmp_path: Path) -> None:
    assert Notifier(None).ready() is False
    n = Notifier(str(tmp_path / "nobody-listens"))
    for _ in range(5):
        assert n.watchdog() is False
    assert n.errors == 5 and n.sent == []


async def test_run_sends_watchdog_only_while_alive(rx: tuple[str, socket.socket]) -> None:
    path, s = rx
    ticks = asyncio.Queue[None]()

    async def sleep(_: float) -> None:  # one watchdog period per item the test puts
        await ticks.get()

    alive = {"ingest": True, "uploader": True}
    stop = asyncio.Event()
    n = Notifier(path, watchdog_s=10.0, sleep=sleep)
    task = asyncio.create_task(n.run(lambda: alive, stop=stop, status=lambda: "ok"))
    for _ in range(2):
        ticks.put_nowait(None)
        await asyncio.sleep(0.01)
    alive["uploader"] = False
    for _ in range(2):
        ticks.put_nowait(None)
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(task, 1)
    msgs = _drain(s)
    assert msgs[0].startswith("READY=1\nSTATUS=ok")
    assert msgs[1:3] == ["WATCHDOG=1\nSTATUS=ok"] * 2
    assert msgs[3:] == ["STOPPING=1\nSTATUS=stopping: draining"]  # withheld while dead


async def test_run_without_watchdog_waits_for_stop(rx: tuple[str, socket.socket]) -> None:
    path, s = rx
    stop = asyncio.Event()
    task = asyncio.create_task(Notifier(path).run(lambda: {"a": True}, stop=stop,
                                                  stop_extend_s=12.5))
    await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(task, 1)
    msgs = _drain(s)
    assert [m.splitlines()[0] for m in msgs] == ["READY=1", "STOPPING=1"]
    assert msgs[1].splitlines()[-1] == "EXTEND_TIMEOUT_USEC=12500000"
