"""The asyncio coordinator with real device jobs clients over the in-memory bus, on
virtual time, with SQLite state: end to end, device-side rollback, abort, refusals,
malformed documents, operator control, restart and resume."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from agent.jobs import JobError, JobsClient
from cloud.fleet.channel import MemoryJobBus
from cloud.fleet.coordinator import Coordinator, state_name
from cloud.fleet.protocol import Health, JobDocument, JobResult, JobStart, JobUpdate, encode
from cloud.fleet.registry import Group
from cloud.fleet.spec import Gate, RolloutSpec, WavePlan
from cloud.fleet.states import DeviceState, FleetError, UnknownRollout
from cloud.fleet.store import RolloutRecord
from cloud.fleet.store_sqlite import SqliteFleetStore
from tests.support.fleet import CoordinatorClock

S = DeviceState
OLD, NEW = "mode = 'old'\n", "mode = 'new'\n"


class Rig:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.clock = CoordinatorClock()
        self.bus = MemoryJobBus()
        self.store = SqliteFleetStore(str(tmp / "fleet.db"))
        self.coord: Coordinator | None = None
        self.clients: dict[str, JobsClient] = {}
        self.applied: dict[str, list[str]] = {}

    async def coordinator(self) -> Coordinator:
        self.coord = Coordinator(store=self.store, channel=self.bus, clock=self.clock,
                                 insecure_control=True)
        self.clock.coordinators = [self.coord]
        await self.coord.start()
        return self.coord

    async def device(self, dev: str, *, healthy: Callable[[], bool] = lambda: True,
                     fail_apply: bool = False, **kw: Any) -> JobsClient:
        cfg = self.tmp / f"{dev}.toml"
        cfg.write_text(OLD)
        self.applied[dev] = []

        def apply(path: Path) -> None:
            text = path.read_text()
            self.applied[dev].append(text)
            if fail_apply and text == NEW:
                raise JobError("bad config", retriable=False)

        c = JobsClient(dev, channel=self.bus.link(dev), apply_config=apply,
                       health=lambda: Health(ok=healthy()), clock=self.clock, config_path=cfg,
                       check_delay_s=2, health_interval_s=15, soak_reports=3, **kw)
        await c.start()
        self.clients[dev] = c
        return c

    def config(self, dev: str) -> str:
        return (self.tmp / f"{dev}.toml").read_text()

    def prev(self, dev: str) -> str:
        return (self.tmp / f"{dev}.toml.prev").read_text()

    async def close(self) -> None:
        for c in self.clients.values():
            await c.stop()
        if self.coord is not None:
            await self.coord.stop()
        await self.store.close()


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    r = Rig(tmp_path)
    await r.store.open()
    yield r
    await r.close()


def spec(**kw: Any) -> RolloutSpec:
    base: dict[str, Any] = dict(
        rollout_id="r1", document=JobDocument(content=NEW), plan=WavePlan(canary=4, growth=2),
        soak_s=60, device_timeout_s=120, max_notifications_per_min=6000, max_retries=1,
        gate=Gate(success_threshold=0.9, min_executed=3))
    base.update(kw)
    return RolloutSpec(**base)


async def test_rollout_end_to_end_with_jobs_clients(rig: Rig) -> None:
    coord = await rig.coordinator()
    await coord.add_devices([(f"d{i}", {"region": "eu"}) for i in range(20)])
    for i in range(20):
        await rig.device(f"d{i}")
    r = await coord.create_rollout(spec())
    assert await rig.clock.run_until(lambda: r.done, max_seconds=3600, step=5)
    assert r.status == "completed" and r.counts[S.SUCCEEDED] == 20
    for i in range(20):
        assert rig.config(f"d{i}") == NEW and rig.prev(f"d{i}") == OLD
        assert rig.applied[f"d{i}"] == [NEW]
    await coord.flush()
    assert await rig.store.transition_count("r1") == coord.transitions == 80
    assert await rig.store.state_counts("r1") == {S.SUCCEEDED: 20}
    st = coord.status()
    assert st["fleet"]["online"] == 20 and st["rollouts"][0]["status"] == "completed"
    text = coord.metrics.render().decode()
    assert 'pymigrate_fleet_transitions_total{to="succeeded"} 20.0' in text
    assert 'pymigrate_fleet_notifications_total{op="apply"} 20.0' in text
    assert 'pymigrate_fleet_rollout_devices{rollout="r1",state="succeeded"} 20.0' in text
    assert state_name(4) == "succeeded"
    # `pymigrate fleet status` reads the same store: per-wave states, rates, ETA
    import argparse

    from cloud.fleet.cli import _status

    out = await _status(argparse.Namespace(store=rig.store.path, rollout="r1",
                                           list_state="succeeded", show_devices=False))
    assert len(out["devices"]["r1"]) == 20
    ro = out["rollouts"][0]
    assert ro["status"] == "completed" and ro["success_rate"] == 1.0 and ro["eta_s"] == 0.0
    assert [w["states"] for w in ro["waves"]] == [{"succeeded": n} for n in (4, 8, 8)]
    assert out["fleet"]["devices"] == 20


async def test_device_health_check_failure_rolls_back_locally(rig: Rig) -> None:
    coord = await rig.coordinator()
    await coord.add_devices([(f"d{i}", {}) for i in range(10)])
    for i in range(10):
        await rig.device(f"d{i}", healthy=(lambda: False) if i == 3 else (lambda: True))
    r = await coord.create_rollout(spec(plan=WavePlan(canary=10),
                                        gate=Gate(success_threshold=0.8, min_executed=3)))
    assert await rig.clock.run_until(lambda: r.done, max_seconds=3600, step=5)
    assert r.status == "completed"
    assert r.device_state(3) == S.FAILED
    assert rig.config("d3") == OLD  # restored by the device itself
    assert rig.applied["d3"] == [NEW, OLD]
    assert rig.clients["d3"].rolled_back == 1


async def test_soak_health_turning_bad_rolls_back(rig: Rig) -> None:
    coord = await rig.coordinator()
    await coord.add_devices([(f"d{i}", {}) for i in range(10)])
    calls = {"n": 0}

    def flaky() -> bool:  # healthy at the post-update check, sick during the soak
        calls["n"] += 1
        return calls["n"] < 2

    for i in range(10):
        await rig.device(f"d{i}", healthy=flaky if i == 0 else (lambda: True))
    r = await coord.create_rollout(spec(plan=WavePlan(canary=10),
                                        gate=Gate(success_threshold=0.8, min_executed=3)))
    assert await rig.clock.run_until(lambda: r.done, max_seconds=3600, step=5)
    assert r.device_state(0) == S.FAILED and rig.config("d0") == OLD


async def test_gate_failure_aborts_and_devices_restore_previous_config(rig: Rig) -> None:
    coord = await rig.coordinator()
    await coord.add_devices([(f"d{i}", {}) for i in range(30)])
    for i in range(30):
        await rig.device(f"d{i}", fail_apply=i % 2 == 0)
    r = await coord.create_rollout(spec(plan=WavePlan(canary=10),
                                        rollback_plan=WavePlan(canary=2, growth=2)))
    assert await rig.clock.run_until(lambda: r.done, max_seconds=3600, step=5)
    assert r.status == "rolled_back"
    touched = [f"d{i}" for i in range(30) if rig.applied[f"d{i}"]]
    assert touched  # canary devices only
    assert all(rig.config(d) == OLD for d in touched)
    assert r.counts[S.QUEUED] == 30 - len(touched) >= 20  # stopped inside the canary
    assert r.counts[S.ROLLED_BACK] == len(touched)
    text = coord.metrics.render().decode()
    assert 'pymigrate_fleet_notifications_total{op="rollback"}' in text


async def test_refused_and_malformed_documents_are_counted(rig: Rig) -> None:
    coord = await rig.coordinator()
    await coord.add_devices([("d0", {}), ("d1", {})])
    await coord.add_group(Group("only-d0", members=("d0",)))
    await rig.device("d0")
    d1 = await rig.device("d1")
    r = await coord.create_rollout(spec(group="only-d0", plan=WavePlan(canary=1),
                                        gate=Gate(min_executed=1)))
    # d1 reports on a job it does not own
    await rig.bus.from_device("d1", "result", encode(JobResult("d1", "r1", "succeeded")))
    # d1's channel carries a document claiming to be d0
    await rig.bus.from_device("d1", "result", encode(JobResult("d0", "r1", "failed")))
    await rig.clock.advance(1)
    assert coord.refused == 2 and d1.refusals == 2
    assert r.device_state(rig.coord.registry.index("d0")) != S.FAILED  # type: ignore[union-attr]
    await rig.bus.from_device("d0", "result", b"{garbage")
    await rig.bus.from_device("d0", "update", b'{"kind":"update","device_id":"d0","v":7}')
    assert coord.rejected == 2
    text = coord.metrics.render().decode()
    assert 'pymigrate_fleet_documents_rejected_total{reason="malformed"} 1.0' in text
    assert 'pymigrate_fleet_documents_rejected_total{reason="version"} 1.0' in text
    assert "pymigrate_fleet_documents_refused_total 2.0" in text
    assert await rig.clock.run_until(lambda: r.done, max_seconds=600, step=5)
    assert r.status == "completed"


async def test_restart_mid_rollout_resumes(rig: Rig) -> None:
    coord = await rig.coordinator()
    await coord.add_devices([(f"d{i}", {}) for i in range(24)])
    for i in range(24):
        await rig.device(f"d{i}")
    r = await coord.create_rollout(spec(plan=WavePlan(canary=4, growth=2)))
    assert await rig.clock.run_until(lambda: len(r.waves) == 2 and r.counts[S.SOAKING] > 0,
                                     max_seconds=3600, step=1)
    before = {S(s): n for s, n in enumerate(r.counts) if n}
    await coord.stop()  # crash-free stop: pending transitions are flushed
    assert await rig.store.state_counts("r1") == {int(s): n for s, n in before.items()}
    coord2 = await rig.coordinator()  # fresh registry and engine, same store and bus
    r2 = coord2.core.get("r1")
    assert [w.end - w.start for w in r2.waves] == [4, 8]
    assert {S(s): n for s, n in enumerate(r2.counts) if n} == before
    assert await rig.clock.run_until(lambda: r2.done, max_seconds=3600, step=5)
    assert r2.status == "completed" and r2.counts[S.SUCCEEDED] == 24
    for i in range(24):
        assert rig.applied[f"d{i}"] == [NEW] and rig.prev(f"d{i}") == OLD
    await coord2.flush()
    assert await rig.store.state_counts("r1") == {S.SUCCEEDED: 24}


async def test_restart_resumes_a_rollback(rig: Rig) -> None:
    coord = await rig.coordinator()
    await coord.add_devices([(f"d{i}", {}) for i in range(12)])
    for i in range(12):
        await rig.device(f"d{i}")
    r = await coord.create_rollout(spec(plan=WavePlan(canary=12),
                                        rollback_plan=WavePlan(canary=2, growth=1)))
    assert await rig.clock.run_until(lambda: r.counts[S.SUCCEEDED] == 12, max_seconds=3600,
                                     step=5)
    coord.abort("r1")  # the first rollback wave is in flight (not yet sent) at the stop
    await coord.stop()
    coord2 = await rig.coordinator()
    r2 = coord2.core.get("r1")
    assert r2.status == "rolling_back"
    persisted = await rig.store.state_counts("r1")
    assert persisted[S.ROLLING_BACK] >= 1
    assert persisted[S.SUCCEEDED] + persisted[S.ROLLING_BACK] == 12
    assert await rig.clock.run_until(lambda: r2.done, max_seconds=3600, step=5)
    assert r2.status == "rolled_back" and r2.counts[S.ROLLED_BACK] == 12
    assert all(rig.config(f"d{i}") == OLD for i in range(12))


async def test_operator_controls_pending_rollouts_and_ingest(rig: Rig) -> None:
    coord = await rig.coordinator()
    await coord.add_devices([(f"d{i}", {}) for i in range(10)])
    for i in range(10):
        await rig.device(f"d{i}")
    s = spec(rollout_id="later", plan=WavePlan(canary=2))
    import msgspec

    await rig.store.save_rollout(RolloutRecord("later", msgspec.json.encode(s).decode(),
                                               msgspec.json.encode(s.plan).decode(),
                                               "pending"))
    await coord.handle_control(b'{"cmd":"load"}')
    r = coord.core.get("later")
    await coord.handle_control(b'{"cmd":"pause","rollout_id":"later"}')
    assert r.status == "paused"
    await coord.handle_control(b'{"cmd":"resume","rollout_id":"later"}')
    assert r.status == "running"
    await coord.handle_control(b'{"cmd":"ingest","lag_s":999}')
    assert r.pacer.backpressure_events == 1
    await coord.handle_control(b'{"cmd":"explode","rollout_id":"later"}')
    await coord.handle_control(b'{"cmd":"pause","rollout_id":"missing"}')
    await coord.handle_control(b"nonsense")
    assert coord.rejected == 3
    coord.pause("later")
    coord.resume("later")
    coord.cancel("later")
    assert r.status == "cancelled"
    with pytest.raises(UnknownRollout):
        coord.abort("nope")
    with pytest.raises(FleetError):
        await coord.create_rollout(s)  # duplicate id
    assert await coord.load_pending() == []
    await coord.drain()


async def test_failed_state_write_keeps_records_and_retries(rig: Rig) -> None:
    coord = await rig.coordinator()
    await coord.add_devices([(f"d{i}", {}) for i in range(4)])
    for i in range(4):
        await rig.device(f"d{i}")
    real = rig.store.commit
    calls = {"n": 0}

    async def flaky(batch: Any, token: int) -> None:
        calls["n"] += 1
        if calls["n"] in (2, 3):  # the commits after the rollout's creation fail
            raise OSError("disk full")
        await real(batch, token)

    rig.store.commit = flaky  # type: ignore[method-assign]
    r = await coord.create_rollout(spec(plan=WavePlan(canary=4)))
    assert await rig.clock.run_until(lambda: r.done, max_seconds=3600, step=1)
    assert await rig.clock.run_until(lambda: calls["n"] >= 4 and not coord._pending,
                                     max_seconds=600, step=1)
    assert coord.write_errors == 2
    await coord.flush()
    assert await rig.store.transition_count("r1") == coord.transitions == 16


async def test_device_progress_is_stored_shown_and_exported(rig: Rig) -> None:
    import argparse

    from cloud.fleet.cli import _status

    coord = await rig.coordinator()
    await coord.add_devices([(f"d{i}", {}) for i in range(4)])
    heard: list[str] = []
    for i in range(4):
        async def silent(kind: str, payload: bytes, dev: str = f"d{i}") -> None:
            heard.append(dev)  # notified, never answers: stays in progress

        await rig.bus.link(f"d{i}").connect(silent)
    r = await coord.create_rollout(spec(plan=WavePlan(canary=4), device_timeout_s=3600))
    assert await rig.clock.run_until(lambda: len(heard) == 4, max_seconds=60, step=1)
    await rig.bus.from_device("d0", "start", encode(JobStart("d0", "r1", 0)))
    await rig.bus.from_device("d0", "update", encode(JobUpdate("d0", "r1", 0, 0.4)))
    await rig.bus.from_device("d1", "update", encode(JobUpdate("d1", "r1", 0, 7.0)))  # clamped
    assert r.device_progress(0) == 0.4 and r.device_progress(1) == 1.0
    st = coord.status()["rollouts"][0]
    assert st["progress"] == 0.35 and st["waves"][0]["progress"] == 0.35
    assert 'pymigrate_fleet_rollout_progress{rollout="r1"} 0.35' in coord.metrics.render().decode()
    await coord.flush()
    out = await _status(argparse.Namespace(store=rig.store.path, rollout="r1",
                                           list_state="", show_devices=True))
    per_dev = {d["device_id"]: d for d in out["device_progress"]["r1"]}
    assert per_dev["d0"]["progress"] == 0.4 and per_dev["d0"]["state"] == "in_progress"
    assert per_dev["d2"]["progress"] == 0.0
    assert out["rollouts"][0]["waves"][0]["progress"] == 0.35
    await coord.stop()
    coord2 = await rig.coordinator()  # restored from the store
    assert coord2.core.get("r1").device_progress(0) == 0.4
