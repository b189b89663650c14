"""Firmware jobs end to end on the device: a real HTTP artifact server on loopback
(aiohttp, Range support, drops the connection halfway once), the shipped two-slot hook
script (configs/fleet/firmware/ab-slot.sh) as install / health / rollback hook, and the
jobs client reporting to a recording fake coordinator over the in-memory job bus."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.firmware import FirmwareUpdater
from agent.jobs import JobsClient
from cloud.fleet.channel import MemoryJobBus
from pymigrate.clock import VirtualClock, WallClock
from tests.support import artifact
from transports.jobs_protocol import (
    FirmwareArtifact,
    Health,
    JobNotify,
    JobResult,
    JobUpdate,
    Message,
    decode,
    encode,
    firmware_document,
)
from transports.jobs_security import sign

pytestmark = pytest.mark.integration
HOOK = artifact.HOOK
server = artifact.server  # fixture: loopback HTTP artifact server

IMAGE = os.urandom(300_000)


class Coordinator:
    """Records what the device sends over the in-memory job bus."""

    def __init__(self) -> None:
        self.bus = MemoryJobBus()
        self.got: list[Message] = []
        self.arrived = asyncio.Event()

    async def start(self) -> None:
        async def handler(dev: str, kind: str, payload: bytes) -> None:
            self.got.append(decode(kind, payload))
            self.arrived.set()

        await self.bus.start(handler)

    async def send(self, msg: JobNotify) -> None:
        await self.bus.send(msg.device_id, "notify", encode(msg))

    async def wait(self, pred: Callable[[Message], bool]) -> Message:
        async with asyncio.timeout(8):
            while True:
                found = [m for m in self.got if pred(m)]
                if found:
                    return found[-1]
                self.arrived.clear()
                await self.arrived.wait()

    async def result(self) -> JobResult:
        res = await self.wait(lambda m: isinstance(m, JobResult))
        assert isinstance(res, JobResult)
        return res

    def updates(self) -> list[JobUpdate]:
        return [m for m in self.got if isinstance(m, JobUpdate) and m.phase]


RELEASE_KEY = Ed25519PrivateKey.generate()


def artifact(url: str, body: bytes = IMAGE, *, version: str = "2.0",
             key: Ed25519PrivateKey | None = RELEASE_KEY) -> FirmwareArtifact:
    art = FirmwareArtifact(version, url, len(body), hashlib.sha256(body).hexdigest())
    return sign(art, key) if key is not None else art


def updater(tmp: Path, clock: Any = None, **kw: Any) -> FirmwareUpdater:
    kw.setdefault("install_cmd", [HOOK, "install"])
    kw.setdefault("health_cmd", [HOOK, "health"])
    kw.setdefault("rollback_cmd", [HOOK, "rollback"])
    return FirmwareUpdater(tmp / "data" / "firmware", verify_key=RELEASE_KEY.public_key(),
                           clock=clock or WallClock(), health_delay_s=0, retry_backoff_s=0.01,
                           report_every_bytes=64 * 1024, cmd_timeout_s=5, **kw)


async def device(tmp: Path, co: Coordinator, fw: FirmwareUpdater,
                 health: Callable[[], Health] = Health) -> JobsClient:
    cfg = tmp / "agent.toml"
    cfg.write_text("v = 1\n")
    c = JobsClient("dev1", channel=co.bus.link("dev1"), apply_config=lambda p: None,
                   health=health, clock=WallClock(), config_path=cfg, check_delay_s=0,
                   soak_reports=0, firmware=fw)
    await c.start()
    return c


@pytest.fixture
async def co(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> AsyncIterator[Coordinator]:
    monkeypatch.setenv("FW_ROOT", str(tmp_path / "fw"))
    c = Coordinator()
    await c.start()
    yield c


async def test_update_resumes_a_broken_download_installs_into_the_other_slot(
        server: Any, co: Coordinator, tmp_path: Path) -> None:
    srv = await server(IMAGE, drop_once=True)
    fw = updater(tmp_path)
    c = await device(tmp_path, co, fw)
    await co.send(JobNotify("fw-2", "dev1", "apply", 0, firmware_document(artifact(srv.url))))
    res = await co.result()
    await c.stop()
    assert (res.status, res.reason) == ("succeeded", "")
    # first GET cut halfway, second asked only for the rest
    assert srv.ranges[0] == "" and len(srv.ranges) == 2
    assert 0 < int(srv.ranges[1][len("bytes="):-1]) < len(IMAGE)
    assert fw.counters["downloads_resumed"] == 1 and fw.counters["signature_verified"] == 1
    fwroot = tmp_path / "fw"
    assert os.readlink(fwroot / "current") == "slot-b"
    assert (fwroot / "slot-b" / "image").read_bytes() == IMAGE
    assert (fwroot / "slot-b" / "VERSION").read_text().strip() == "2.0"
    assert not list((tmp_path / "data" / "firmware").glob("*.part"))  # budget freed
    ups = co.updates()
    assert [u.phase for u in ups][-3:] == ["verify", "install", "health"]
    dl = [u for u in ups if u.phase == "download"]
    assert dl[-1].bytes_done == dl[-1].bytes_total == len(IMAGE)
    assert [u.bytes_done for u in dl] == sorted(u.bytes_done for u in dl)
    assert 0 < dl[len(dl) // 2].progress < 0.8 and ups[-1].progress == 0.95
    # the same job delivered again (pull after reconnect) is answered, not re-installed
    c = await device(tmp_path, co, fw)
    co.got.clear()
    await co.send(JobNotify("fw-2", "dev1", "apply", 0, firmware_document(artifact(srv.url))))
    assert (await co.result()).status == "succeeded"
    await c.stop()
    assert len(srv.ranges) == 2 and os.readlink(fwroot / "current") == "slot-b"


async def test_corrupted_artifact_is_refused_and_nothing_installed(
        server: Any, co: Coordinator, tmp_path: Path) -> None:
    bad = bytearray(IMAGE)
    bad[1234] ^= 0xFF
    srv = await server(bytes(bad))
    fw = updater(tmp_path)
    c = await device(tmp_path, co, fw)
    await co.send(JobNotify("fw-2", "dev1", "apply", 0, firmware_document(artifact(srv.url))))
    res = await co.result()
    await c.stop()
    assert (res.status, res.reason, res.retriable) == ("rejected", "firmware:sha256_mismatch",
                                                       False)
    assert not (tmp_path / "fw").exists()  # the install hook never ran
    assert not list((tmp_path / "data" / "firmware").glob("*.part"))


@pytest.mark.parametrize(("key", "reason"), [(Ed25519PrivateKey.generate(), "bad_signature"),
                                             (None, "unsigned")])
async def test_image_not_signed_by_the_release_key_is_refused(
        server: Any, co: Coordinator, tmp_path: Path, key: Ed25519PrivateKey | None,
        reason: str) -> None:
    srv = await server(IMAGE)
    fw = updater(tmp_path)
    c = await device(tmp_path, co, fw)
    doc = firmware_document(artifact(srv.url, key=key))
    await co.send(JobNotify("fw-2", "dev1", "apply", 0, doc))
    res = await co.result()
    await c.stop()
    assert (res.status, res.reason) == ("rejected", f"firmware:{reason}")
    assert not (tmp_path / "fw").exists() and fw.counters["signature_verified"] == 0


async def test_failing_health_check_calls_rollback_hook_and_reports_failed(
        server: Any, co: Coordinator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FW_HEALTH_CMD", "echo app does not start; exit 3")
    srv = await server(IMAGE)
    fw = updater(tmp_path)
    c = await device(tmp_path, co, fw)
    await co.send(JobNotify("fw-3", "dev1", "apply", 0, firmware_document(artifact(srv.url))))
    res = await co.result()
    await c.stop()
    assert (res.status, res.reason) == ("failed", "firmware:health_check_exit_3")
    assert os.readlink(tmp_path / "fw" / "current") == "slot-a"  # switched back
    assert fw.counters["rolled_back"] == 1 and c.rolled_back == 1


async def test_agent_health_gate_after_update_rolls_firmware_back(
        server: Any, co: Coordinator, tmp_path: Path) -> None:
    srv = await server(IMAGE)
    c = await device(tmp_path, co, updater(tmp_path), health=lambda: Health(ok=False))
    await co.send(JobNotify("fw-4", "dev1", "apply", 0, firmware_document(artifact(srv.url))))
    res = await co.result()
    await c.stop()
    assert (res.status, res.reason) == ("failed", "post_update_health")
    assert os.readlink(tmp_path / "fw" / "current") == "slot-a"


async def test_after_a_restart_the_installed_image_is_health_checked_not_refetched(
        server: Any, co: Coordinator, tmp_path: Path) -> None:
    srv = await server(IMAGE)
    vclock = VirtualClock()  # never advanced: the first process dies before its check
    first = updater(tmp_path, vclock)
    first.health_delay_s = 30
    c = await device(tmp_path, co, first)
    doc = firmware_document(artifact(srv.url))
    await co.send(JobNotify("fw-5", "dev1", "apply", 0, doc))
    # "health" is reported once the install hook returned and "installed" is on disk
    await co.wait(lambda m: isinstance(m, JobUpdate) and m.phase == "health")
    state = tmp_path / "data" / "firmware" / "state.json"
    assert json.loads(state.read_text())["phase"] == "installed"
    await c.stop()  # the install hook restarted the device
    assert not [m for m in co.got if isinstance(m, JobResult)]
    c = await device(tmp_path, co, updater(tmp_path))  # the agent after the restart
    await co.send(JobNotify("fw-5", "dev1", "apply", 0, doc))  # the job again (pull)
    res = await co.result()
    await c.stop()
    assert res.status == "succeeded"
    assert len(srv.ranges) == 1  # not downloaded twice
    assert os.readlink(tmp_path / "fw" / "current") == "slot-b"


async def test_image_over_the_byte_budget_is_refused_before_download(
        server: Any, co: Coordinator, tmp_path: Path) -> None:
    srv = await server(IMAGE)
    c = await device(tmp_path, co, updater(tmp_path, max_bytes=100_000))
    await co.send(JobNotify("fw-6", "dev1", "apply", 0, firmware_document(artifact(srv.url))))
    res = await co.result()
    await c.stop()
    assert (res.status, res.reason) == ("rejected", "firmware:too_large")
    assert srv.ranges == []
