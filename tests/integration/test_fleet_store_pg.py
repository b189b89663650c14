"""PostgreSQL coordinator state: the store contract, and a restart that resumes."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from cloud.fleet.channel import MemoryJobBus
from cloud.fleet.coordinator import Coordinator
from cloud.fleet.protocol import JobResult, JobStart, decode, encode
from cloud.fleet.registry import DeviceRow, Group
from cloud.fleet.spec import Gate, RolloutSpec, WavePlan
from cloud.fleet.states import DeviceState, FleetError
from cloud.fleet.store import RolloutRecord, TransitionRecord, open_store
from cloud.fleet.store_pg import PostgresFleetStore
from tests.support.fleet import CoordinatorClock

pytestmark = pytest.mark.integration
S = DeviceState


@pytest.fixture
async def pg(postgres_dsn: str) -> AsyncIterator[PostgresFleetStore]:
    store = PostgresFleetStore(postgres_dsn, schema=f"fleet_{uuid.uuid4().hex[:10]}")
    await store.open()
    try:
        yield store
    finally:
        await store.drop_schema()
        await store.close()


async def test_store_contract(pg: PostgresFleetStore) -> None:
    await pg.save_devices([DeviceRow("a", {"region": "eu"}, True, 10, 1.5, 0.1, 99),
                           DeviceRow("b", {}, False)])
    await pg.save_devices([DeviceRow("a", {"region": "us"}, True, 20)])
    rows = await pg.load_devices()
    assert [r.device_id for r in rows] == ["a", "b"]
    assert rows[0].attrs == {"region": "us"} and rows[0].backlog_bytes == 20
    assert rows[1].online is False
    await pg.save_group(Group("eu", selector={"region": ["eu", "eu-*"]}))
    await pg.save_group(Group("s", members=("a",)))
    assert {g.name for g in await pg.load_groups()} == {"eu", "s"}
    await pg.save_rollout(RolloutRecord("r", "{}", "{}", "running", created_ms=1))
    await pg.save_rollout(RolloutRecord("r", "{}", "{}", "paused", "gate", created_ms=1))
    recs = await pg.load_rollouts()
    assert [(x.status, x.reason) for x in recs] == [("paused", "gate")]
    await pg.add_targets("r", ["a", "b"], 5)
    await pg.save_transitions([TransitionRecord("r", "a", 0, 1, 0, "", 10),
                               TransitionRecord("r", "a", 1, 2, 0, "", 11)])
    await pg.save_transitions([])
    assert await pg.state_counts("r") == {0: 1, 2: 1}
    assert await pg.transition_count("r") == 2
    states = {s.device_id: s for s in await pg.load_device_states("r")}
    assert states["a"].state == 2 and states["a"].since_ms == 11
    with pytest.raises(FleetError):
        PostgresFleetStore("postgresql://x", schema="Bad-Name")


async def test_coordinator_resumes_from_postgres(pg: PostgresFleetStore) -> None:
    clock = CoordinatorClock()
    bus = MemoryJobBus()
    answered: dict[str, int] = {}

    def device(dev: str) -> Any:
        async def on_notify(kind: str, payload: bytes) -> None:
            msg = decode(kind, payload)
            answered[dev] = answered.get(dev, 0) + 1
            job = getattr(msg, "job_id", "")
            await bus.from_device(dev, "start", encode(JobStart(dev, job)))
            await bus.from_device(dev, "result", encode(JobResult(dev, job, "succeeded")))

        return on_notify

    for i in range(12):
        await bus.link(f"d{i}").connect(device(f"d{i}"))
    coord = Coordinator(store=pg, channel=bus, clock=clock)
    clock.coordinators = [coord]
    await coord.start()
    await coord.add_devices([(f"d{i}", {}) for i in range(12)])
    spec = RolloutSpec("pg", plan=WavePlan(canary=3, growth=3), soak_s=30,
                       max_notifications_per_min=6000, gate=Gate(min_executed=3))
    r = await coord.create_rollout(spec)
    assert await clock.run_until(lambda: len(r.waves) == 2, max_seconds=600, step=1)
    await coord.stop()
    coord2 = Coordinator(store=pg, channel=bus, clock=clock)
    clock.coordinators = [coord2]
    await coord2.start()
    assert coord2.token == coord.token + 1  # a new fencing token per leadership
    r2 = coord2.core.get("pg")
    assert [w.end - w.start for w in r2.waves] == [3, 9]
    assert await clock.run_until(lambda: r2.done, max_seconds=3600, step=5)
    assert r2.status == "completed" and r2.counts[S.SUCCEEDED] == 12
    await coord2.stop()
    assert await pg.state_counts("pg") == {S.SUCCEEDED: 12}
    assert set(answered) == {f"d{i}" for i in range(12)}


async def test_open_store_picks_backend(postgres_dsn: str, tmp_path: Any) -> None:
    assert isinstance(open_store(postgres_dsn), PostgresFleetStore)
    s = open_store(f"sqlite://{tmp_path}/x.db")
    await s.open()
    await s.close()
    assert (tmp_path / "x.db").exists()
