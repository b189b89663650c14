"""The resumable artifact download (transports.jobs_artifact) against servers that
misbehave, the firmware config checks, and the coordinator's firmware document checks."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import parse_agent_config
from agent.firmware import FirmwareError, FirmwareUpdater, phase_progress
from cloud.fleet.cli import main
from cloud.fleet.firmware import check_firmware_document, sign_firmware
from pymigrate.clock import WallClock
from pymigrate.errors import ConfigError, TransportError
from tests.conftest import free_port
from transports.jobs_artifact import ArtifactError, fetch_range
from transports.jobs_protocol import FirmwareArtifact, JobDocument, firmware_document
from transports.jobs_security import generate_keypair, sign

pytestmark = pytest.mark.integration
BODY = os.urandom(100_000)


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Any]]:
    runners: list[web.AppRunner] = []

    async def start(handler: Callable[[web.Request], Any]) -> str:
        app = web.Application()
        app.router.add_get("/a", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        return f"http://127.0.0.1:{port}/a"

    yield start
    for r in runners:
        await r.cleanup()


async def _noop(n: int) -> None:
    return None


async def test_server_ignoring_range_restarts_the_file(serve: Any, tmp_path: Path) -> None:
    async def full(request: web.Request) -> web.Response:
        return web.Response(body=BODY)  # 200 with the whole body, Range or not

    url = await serve(full)
    dest = tmp_path / "a.part"
    dest.write_bytes(b"garbage!" * 10)  # a partial that is not a prefix of the body
    assert await fetch_range(url, dest, size=len(BODY), on_bytes=_noop) == len(BODY)
    assert dest.read_bytes() == BODY


@pytest.mark.parametrize(("status", "error", "retriable"),
                         [(404, ArtifactError, False), (503, TransportError, True)])
async def test_http_errors_map_to_project_errors(serve: Any, tmp_path: Path, status: int,
                                                 error: type[Exception],
                                                 retriable: bool) -> None:
    async def fail(request: web.Request) -> web.Response:
        return web.Response(status=status)

    url = await serve(fail)
    with pytest.raises(error) as info:
        await fetch_range(url, tmp_path / "a.part", size=10, on_bytes=_noop)
    assert getattr(info.value, "retriable") is retriable  # noqa: B009
    assert getattr(info.value, "reason") == f"http_{status}"  # noqa: B009


async def test_more_bytes_than_announced_is_refused(serve: Any, tmp_path: Path) -> None:
    async def big(request: web.Request) -> web.Response:
        return web.Response(body=BODY)

    url = await serve(big)
    with pytest.raises(ArtifactError) as info:
        await fetch_range(url, tmp_path / "a.part", size=1000, on_bytes=_noop)
    assert info.value.reason == "size_mismatch"


async def test_download_that_never_finishes_fails_retriable_after_its_retries(
        serve: Any, tmp_path: Path) -> None:
    calls = []

    async def down(request: web.Request) -> web.Response:
        calls.append(request.headers.get("Range", ""))
        return web.Response(status=502)

    url = await serve(down)
    key = Ed25519PrivateKey.generate()
    art = sign(FirmwareArtifact("1", url, len(BODY), hashlib.sha256(BODY).hexdigest()), key)
    fw = FirmwareUpdater(tmp_path, verify_key=key.public_key(), install_cmd=["true"],
                         clock=WallClock(), download_retries=2, retry_backoff_s=0.01)

    async def report(phase: str, done: int, total: int) -> None:
        return None

    with pytest.raises(FirmwareError) as info:
        await fw.apply("j", msgspec.to_builtins(art), report)
    assert (info.value.reason, info.value.retriable, info.value.refused) == ("download",
                                                                             True, False)
    assert len(calls) == 3
    with pytest.raises(FirmwareError) as bad:  # args that are not an artifact
        await fw.apply("j2", {"url": url}, report)
    assert bad.value.reason == "bad_args" and bad.value.refused


def test_phase_progress_is_monotonic_over_the_job() -> None:
    seq = [phase_progress("download", n, 100) for n in (0, 50, 100)] + [
        phase_progress(p, 100, 100) for p in ("verify", "install", "health")]
    assert seq == sorted(seq) and seq[0] == 0 and seq[-1] < 1


def test_firmware_config_names_the_missing_key(tmp_path: Path) -> None:
    base: dict[str, Any] = {"jobs": {"enabled": True, "allow_unsigned": True,
                                     "firmware": {"enabled": True}}}
    with pytest.raises(ConfigError) as info:
        parse_agent_config(base)
    assert info.value.key == "jobs.firmware.verify_key"
    base["jobs"]["firmware"]["verify_key"] = "release.pub"
    with pytest.raises(ConfigError) as info:
        parse_agent_config(base)
    assert info.value.key == "jobs.firmware.install_cmd"
    base["jobs"]["firmware"]["install_cmd"] = ["/bin/true"]
    cfg = parse_agent_config(base)
    assert cfg.jobs.firmware.max_bytes == 64 * 1024 * 1024


def test_sign_firmware_and_rollout_checks(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    key, _pub = generate_keypair(tmp_path, "release")
    image = tmp_path / "fw.bin"
    image.write_bytes(BODY)
    doc = sign_firmware(image, url="https://fw.example/fw.bin", version="3", key_file=key)
    check_firmware_document(doc)  # signed and well formed
    assert doc.args["sha256"] == hashlib.sha256(BODY).hexdigest()
    unsigned = firmware_document(FirmwareArtifact("3", "https://x/y", 1, "0" * 64))
    with pytest.raises(ConfigError) as info:
        check_firmware_document(unsigned)
    assert info.value.key == "rollout.document.args.sig"
    with pytest.raises(ConfigError) as info:
        check_firmware_document(JobDocument(type="command", hook="firmware", args={"u": 1}))
    assert info.value.key == "rollout.document.args"
    with pytest.raises(ConfigError) as info:
        sign_firmware(image, url="ftp://x", version="3", key_file=key)
    assert info.value.key == "url"
    assert main(["sign-firmware", str(tmp_path / "missing.bin"), "--key", str(key), "--url",
                 "https://x/y", "--version", "1"]) == 2
    assert "cannot read firmware image" in capsys.readouterr().err


async def test_unsigned_firmware_rollout_is_refused_at_creation(tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    doc = firmware_document(FirmwareArtifact("3", "https://x/y", 1, "0" * 64))
    spec.write_bytes(msgspec.json.encode({"rollout_id": "fw", "document": doc}))
    rc = await asyncio.to_thread(main, ["create-rollout", "--store", str(tmp_path / "f.db"),
                                        "--spec", str(spec)])
    assert rc == 2
