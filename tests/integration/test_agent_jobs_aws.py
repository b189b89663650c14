"""The agent's jobs client over the AWS IoT Jobs device protocol (transports.jobs_aws),
against an emulation of the reserved ``$aws/things/<thing>/jobs/...`` topics on a private
Mosquitto (tests/support/aws_jobs.py follows the documented message shapes)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.firmware import FirmwareUpdater
from agent.jobs import JobsClient
from pymigrate.clock import WallClock
from pymigrate.errors import TransportError
from tests.support import artifact
from tests.support.aws_jobs import AwsJobsEmulator, private_mosquitto
from transports.jobs_aws import AwsJobsLink
from transports.jobs_protocol import FirmwareArtifact, Health, JobUpdate, encode
from transports.jobs_security import sign

pytestmark = pytest.mark.integration
server = artifact.server  # fixture: loopback HTTP artifact server


async def until(pred: Callable[[], bool]) -> None:
    for _ in range(400):  # bounded: 8 s
        if pred():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


async def client(port: int, tmp: Path, **kw: Any) -> tuple[JobsClient, AwsJobsLink]:
    link = AwsJobsLink("127.0.0.1", port, "gw-7")
    await link.start()
    cfg = tmp / "agent.toml"
    cfg.write_text("v = 1\n")
    c = JobsClient("gw-7", channel=link, apply_config=lambda p: None, health=Health,
                   clock=WallClock(), config_path=cfg, check_delay_s=0, soak_reports=0, **kw)
    await c.start()
    return c, link


async def test_config_job_pulled_with_start_next_and_reported_succeeded(
        tmp_path: Path) -> None:
    async with private_mosquitto(tmp_path) as port, AwsJobsEmulator(port) as aws:
        # queued before the device connects: found by start-next (pull on start)
        await aws.add_job("gw-7", "cfg-1", {"operation": "apply", "rollout": "cfg-1",
                                            "document": {"type": "config",
                                                         "content": "v = 2\n"}})
        c, _ = await client(port, tmp_path)
        try:
            await until(lambda: aws.execution("gw-7", "cfg-1")["status"] == "SUCCEEDED")
            # a second job arrives by notify-next while connected
            await aws.add_job("gw-7", "ext-1", {"something": "else"})  # not ours
            await until(lambda: aws.execution("gw-7", "ext-1")["status"] == "REJECTED")
        finally:
            await c.stop()
        assert (tmp_path / "agent.toml").read_text() == "v = 2\n"
        ups = aws.history[("gw-7", "cfg-1")]
        assert [u["status"] for u in ups] == ["IN_PROGRESS", "SUCCEEDED"]
        # every update names the version it saw; the emulator bumps it on each accept
        assert [u["expectedVersion"] for u in ups] == [2, 3]
        assert aws.execution("gw-7", "ext-1")["statusDetails"] == {
            "reason": "not_a_pymigrate_job"}
        assert any(t.endswith("/start-next") for t, _ in aws.requests)


async def test_firmware_job_over_aws_reports_phase_and_bytes_then_succeeds(
        tmp_path: Path, server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FW_ROOT", str(tmp_path / "fw"))
    image = os.urandom(150_000)
    srv = await server(image)
    key = Ed25519PrivateKey.generate()
    art = sign(FirmwareArtifact("2.1", srv.url, len(image), hashlib.sha256(image).hexdigest()),
               key)
    fw = FirmwareUpdater(tmp_path / "data" / "firmware", verify_key=key.public_key(),
                         install_cmd=[artifact.HOOK, "install"],
                         health_cmd=[artifact.HOOK, "health"],
                         rollback_cmd=[artifact.HOOK, "rollback"], clock=WallClock(),
                         health_delay_s=0, report_every_bytes=64 * 1024)
    async with private_mosquitto(tmp_path) as port, AwsJobsEmulator(port) as aws:
        c, _ = await client(port, tmp_path, firmware=fw)
        try:
            await aws.add_job("gw-7", "fw-21", {
                "operation": "apply", "rollout": "fw-21",
                "document": {"type": "command", "hook": "firmware",
                             "args": msgspec.to_builtins(art)}})
            await until(lambda: aws.execution("gw-7", "fw-21")["status"] == "SUCCEEDED")
        finally:
            await c.stop()
        ups = aws.history[("gw-7", "fw-21")]
        phases = [u["statusDetails"].get("phase") for u in ups]
        assert {"download", "verify", "install", "health"} <= set(phases)
        last_dl = [u for u in ups if u["statusDetails"].get("phase") == "download"][-1]
        assert last_dl["statusDetails"]["bytes_done"] == str(len(image))
        assert ups[-1]["status"] == "SUCCEEDED"
        assert os.readlink(tmp_path / "fw" / "current") == "slot-b"


async def test_expected_version_resync_and_rejections_named(tmp_path: Path) -> None:
    async with private_mosquitto(tmp_path) as port, AwsJobsEmulator(port) as aws:
        link = AwsJobsLink("127.0.0.1", port, "gw-7", answer_timeout_s=5)
        got: list[bytes] = []

        async def handler(kind: str, payload: bytes) -> None:
            got.append(payload)

        await link.start()
        await link.connect(handler)
        try:
            await aws.add_job("gw-7", "j1", {"operation": "apply", "document": {}})
            await until(lambda: bool(got))
            notify = json.loads(got[0])
            assert (notify["job_id"], notify["op"], notify["attempt"]) == ("j1", "apply", 1)
            aws.execution("gw-7", "j1")["versionNumber"] = 7  # moved on meanwhile
            await link.publish("update", encode(JobUpdate("gw-7", "j1", 1, 0.5)))
            # rejected once (VersionMismatch), resynced from the rejection, sent again
            assert link.rejected == {"VersionMismatch": 1}
            sent = [b["expectedVersion"] for t, b in aws.requests if t.endswith("j1/update")]
            assert sent == [1, 7] and aws.execution("gw-7", "j1")["versionNumber"] == 8
            aws.execution("gw-7", "j1")["status"] = "CANCELED"  # cancelled in the cloud
            with pytest.raises(TransportError) as info:
                await link.publish("update", encode(JobUpdate("gw-7", "j1", 1, 0.6)))
            assert info.value.reason == "aws_InvalidStateTransition"
            await link.publish("update", encode(JobUpdate("gw-7", None, health=Health())))
            assert link.dropped == 1  # a health report has no AWS topic
        finally:
            await link.close()


AGENT = """
[device]
id = "gw-7"
data_dir = "{data}"

[[sources]]
type = "weather"
sensors = 2
interval_s = 0.05

[retry]
profile = "{profile}"

[jobs]
enabled = true
protocol = "aws-iot"
host = "127.0.0.1"
port = {port}
check_delay_s = 0.05
heartbeat_s = 0

[log]
level = "warning"
"""


async def test_real_agent_with_protocol_aws_iot_applies_a_config_job(tmp_path: Path) -> None:
    from agent.config import load_agent_config
    from agent.supervisor import Agent
    from cloud.ingest import IngestService
    from cloud.stores import SqliteStore
    from tests.support.loopback import LoopbackUplink

    async with private_mosquitto(tmp_path) as port, AwsJobsEmulator(port) as aws:
        cfg = tmp_path / "agent.toml"
        cfg.write_text(AGENT.format(data=tmp_path / "var", port=port, profile="unmetered"))
        store = SqliteStore(tmp_path / "cloud.db")
        await store.open()
        agent = Agent(load_agent_config(cfg), uplinks=[LoopbackUplink(IngestService(store),
                                                                      "gw-7")])
        run = asyncio.create_task(agent.run(), name="test[agent]")
        try:
            await asyncio.wait_for(agent.started.wait(), 10)
            await until(lambda: any(t.endswith("/start-next") for t, _ in aws.requests))
            new = AGENT.format(data=tmp_path / "var", port=port, profile="metered")
            await aws.add_job("gw-7", "cfg-2", {"operation": "apply",
                                                "document": {"type": "config",
                                                             "content": new}})
            await until(lambda: aws.execution("gw-7", "cfg-2")["status"] == "SUCCEEDED")
            assert agent.config.retry.profile == "metered"  # applied live
        finally:
            agent.request_stop()
            await asyncio.wait_for(run, 30)
            await store.close()


def test_jobs_protocol_is_checked() -> None:
    from agent.config import parse_agent_config
    from pymigrate.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        parse_agent_config({"jobs": {"protocol": "greengrass"}})
    assert info.value.key == "jobs.protocol"
    # AWS IoT authenticates the job topics: no coordinator verify key needed
    assert parse_agent_config({"jobs": {"enabled": True, "protocol": "aws-iot"}}).jobs.enabled
