"""Device-side jobs client (agent.jobs) against a recording fake coordinator."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from agent.jobs import JobError, JobsClient, atomic_write
from cloud.fleet.channel import MemoryJobBus
from cloud.fleet.protocol import (
    Health,
    JobDocument,
    JobNotify,
    JobResult,
    JobStart,
    JobUpdate,
    Message,
    decode,
    encode,
)
from pymigrate.clock import VirtualClock


class FakeCoordinator:
    def __init__(self) -> None:
        self.bus = MemoryJobBus()
        self.got: list[Message] = []

    async def start(self) -> None:
        async def handler(dev: str, kind: str, payload: bytes) -> None:
            self.got.append(decode(kind, payload))

        await self.bus.start(handler)

    async def send(self, msg: JobNotify) -> None:
        await self.bus.send(msg.device_id, "notify", encode(msg))

    def results(self) -> list[JobResult]:
        return [m for m in self.got if isinstance(m, JobResult)]


@pytest.fixture
async def fc() -> AsyncIterator[FakeCoordinator]:
    f = FakeCoordinator()
    await f.start()
    yield f


async def make(fc: FakeCoordinator, tmp: Path, clock: VirtualClock, **kw: Any) -> JobsClient:
    cfg = tmp / "agent.toml"
    if not cfg.exists():
        cfg.write_text("v = 1\n")
    kw.setdefault("apply_config", lambda p: None)
    kw.setdefault("health", lambda: Health())
    c = JobsClient("dev1", channel=fc.bus.link("dev1"), clock=clock, config_path=cfg,
                   check_delay_s=1, health_interval_s=10, soak_reports=2, **kw)
    await c.start()
    return c


async def test_pull_on_start_apply_report_and_soak_health(fc: FakeCoordinator,
                                                          tmp_path: Path) -> None:
    clock = VirtualClock()
    c = await make(fc, tmp_path, clock)
    assert fc.got == [JobStart("dev1")]  # pull
    await fc.send(JobNotify("j1", "dev1", "apply", 0, JobDocument(content="v = 2\n")))
    await clock.advance(1)
    assert (tmp_path / "agent.toml").read_text() == "v = 2\n"
    assert (tmp_path / "agent.toml.prev").read_text() == "v = 1\n"
    assert fc.results() == [JobResult("dev1", "j1", "succeeded", health=Health())]
    await clock.advance(25)
    updates = [m for m in fc.got if isinstance(m, JobUpdate)]
    assert len(updates) == 2 and all(u.job_id == "j1" for u in updates)
    state = json.loads((tmp_path / "agent.toml.jobs.json").read_text())
    assert state["j1"]["status"] == "succeeded"
    # duplicate delivery (QoS 1 / pull after restart): answered, not re-applied
    await fc.send(JobNotify("j1", "dev1", "apply", 1, JobDocument(content="v = 2\n")))
    await clock.advance(1)
    assert fc.results()[-1].status == "succeeded"
    assert (tmp_path / "agent.toml.prev").read_text() == "v = 1\n"
    assert c.applied == 1
    await c.pull()
    await c.stop()


async def test_apply_failure_restores_and_reports_retriable(fc: FakeCoordinator,
                                                            tmp_path: Path) -> None:
    clock = VirtualClock()
    seen: list[str] = []

    def apply(p: Path) -> None:
        seen.append(p.read_text())
        if p.read_text() == "broken\n":
            raise JobError("cannot load", retriable=True)

    c = await make(fc, tmp_path, clock, apply_config=apply)
    await fc.send(JobNotify("j1", "dev1", "apply", 0, JobDocument(content="broken\n")))
    await clock.advance(1)
    r = fc.results()[-1]
    assert r.status == "failed" and r.retriable and r.reason == "apply:JobError"
    assert (tmp_path / "agent.toml").read_text() == "v = 1\n"
    assert seen == ["broken\n", "v = 1\n"]
    await c.stop()


async def test_rollback_command_restores_previous_config(fc: FakeCoordinator,
                                                          tmp_path: Path) -> None:
    clock = VirtualClock()
    c = await make(fc, tmp_path, clock)
    await fc.send(JobNotify("j1", "dev1", "apply", 0, JobDocument(content="v = 2\n")))
    await clock.advance(1)
    await fc.send(JobNotify("j1", "dev1", "rollback", 0, JobDocument(content="v = 2\n")))
    await clock.advance(1)
    assert fc.results()[-1].status == "rolled_back"
    assert (tmp_path / "agent.toml").read_text() == "v = 1\n"
    assert c.rolled_back == 1
    # rollback of a job never applied: nothing to undo, still reported
    await fc.send(JobNotify("j9", "dev1", "rollback", 0))
    await clock.advance(1)
    assert fc.results()[-1] == JobResult("dev1", "j9", "rolled_back")
    await c.stop()


async def test_command_hooks_and_unknown_hook(fc: FakeCoordinator, tmp_path: Path) -> None:
    clock = VirtualClock()
    calls: list[tuple[dict[str, Any], bool]] = []

    async def firmware(args: Mapping[str, Any], rollback: bool) -> None:
        calls.append((dict(args), rollback))
        if rollback and args.get("stuck"):
            raise JobError("cannot downgrade")

    c = await make(fc, tmp_path, clock, hooks={"firmware": firmware})
    doc = JobDocument(type="command", hook="firmware", args={"version": "2.1"})
    await fc.send(JobNotify("fw", "dev1", "apply", 0, doc))
    await clock.advance(1)
    assert fc.results()[-1].status == "succeeded"
    await fc.send(JobNotify("fw", "dev1", "rollback", 0, doc))
    await clock.advance(1)
    assert calls == [({"version": "2.1"}, False), ({"version": "2.1"}, True)]
    await fc.send(JobNotify("x", "dev1", "apply", 0,
                            JobDocument(type="command", hook="bios")))
    await clock.advance(1)
    assert fc.results()[-1].status == "rejected"
    stuck = JobDocument(type="command", hook="firmware", args={"stuck": True})
    await fc.send(JobNotify("fw2", "dev1", "apply", 0, stuck))
    await clock.advance(1)
    await fc.send(JobNotify("fw2", "dev1", "rollback", 0, stuck))
    await clock.advance(1)
    assert fc.results()[-1].status == "rollback_failed"
    await c.stop()


async def test_bad_documents_refusals_and_internal_errors(fc: FakeCoordinator,
                                                          tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    clock = VirtualClock()

    def health() -> Health:
        raise RuntimeError("sensor bus down")

    c = await make(fc, tmp_path, clock, health=health)
    await fc.bus.send("dev1", "notify", b"{nope")
    await fc.bus.send("dev1", "notify", encode(JobNotify("j", "other", "apply")))
    assert c.rejected == 2
    await fc.send(JobNotify("j", "dev1", "refused", reason="not_owner"))
    assert c.refusals == 1
    await fc.send(JobNotify("j", "dev1", "cancel"))
    # a crashing health check counts as unhealthy: the device rolls back by itself
    await fc.send(JobNotify("j2", "dev1", "apply", 0, JobDocument(content="v = 3\n")))
    await clock.advance(1)
    r = fc.results()[-1]
    assert r.status == "failed" and r.reason == "post_update_health"
    assert (tmp_path / "agent.toml").read_text() == "v = 1\n"

    async def boom(msg: JobNotify) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(c, "_apply", boom)
    await fc.send(JobNotify("j3", "dev1", "apply", 0, JobDocument(content="v = 4\n")))
    await clock.advance(1)
    r = fc.results()[-1]
    assert r.status == "failed" and r.reason == "internal" and r.retriable
    await c.stop()


async def test_heartbeat_reports_health_periodically(fc: FakeCoordinator,
                                                     tmp_path: Path) -> None:
    clock = VirtualClock()
    n = {"calls": 0}

    def health() -> Health:
        n["calls"] += 1
        if n["calls"] == 2:
            raise RuntimeError("flaky sensor")
        return Health(backlog_bytes=n["calls"])

    c = await make(fc, tmp_path, clock, health=health, heartbeat_s=60)
    await clock.advance(60 * 4)
    beats = [m for m in fc.got if isinstance(m, JobUpdate)]
    assert [b.health.backlog_bytes for b in beats if b.health] == [1, 3, 4]
    await c.stop()


async def test_state_file_survives_and_corrupt_state_is_ignored(fc: FakeCoordinator,
                                                                 tmp_path: Path) -> None:
    (tmp_path / "agent.toml.jobs.json").write_text("[1, 2]")
    clock = VirtualClock()
    c = await make(fc, tmp_path, clock)
    assert c._done == {}
    for i in range(70):
        c._remember(f"j{i}", 0, "succeeded")
    assert len(json.loads((tmp_path / "agent.toml.jobs.json").read_text())) == 64
    (tmp_path / "agent.toml.jobs.json").unlink()
    (tmp_path / "agent.toml.jobs.json").mkdir()  # unwritable state: still reports
    c._remember("jx", 0, "failed")
    assert "jx" in c._done
    atomic_write(tmp_path / "x.bin", b"abc")
    assert (tmp_path / "x.bin").read_bytes() == b"abc"
    assert not (tmp_path / "x.bin.tmp").exists()
    await c.stop()
