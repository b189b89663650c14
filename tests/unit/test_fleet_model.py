"""Fleet specs, plans, windows, registry/groups, protocol validation, states, dry run."""

from __future__ import annotations

import pytest

from cloud.fleet.protocol import (
    Health,
    JobDocument,
    JobNotify,
    JobResult,
    JobStart,
    ProtocolError,
    decode,
    encode,
    kind_of,
)
from cloud.fleet.registry import Group, Registry, UnknownDevice, UnknownGroup
from cloud.fleet.sim import FleetModel, dry_run, summary, terminal_fraction
from cloud.fleet.spec import (
    Gate,
    RolloutSpec,
    WavePlan,
    Window,
    derive_plan,
    effective_plan,
    next_open,
    parse_spec,
    predict_seconds,
    wave_sizes,
    window_open,
)
from cloud.fleet.states import TRANSITIONS, DeviceState, allowed, check_transition
from pymigrate.errors import ConfigError, DecodeError

S = DeviceState
T0 = 1_767_225_600.0  # Thursday 00:00 UTC


def test_wave_sizes_canary_growth_and_cap() -> None:
    assert wave_sizes(100, WavePlan(canary=5, growth=2)) == [5, 10, 20, 40, 25]
    assert wave_sizes(1000, WavePlan(canary_pct=1, growth=3, max_wave=200)) == [
        10, 30, 90, 200, 200, 200, 200, 70]
    assert wave_sizes(0, WavePlan()) == []
    assert sum(wave_sizes(12345, WavePlan(canary_pct=2.5, growth=1.0))) == 12345


def test_plan_derived_from_deadline() -> None:
    spec = RolloutSpec("r", deadline_s=3600, expected_update_s=300, soak_s=120,
                       max_notifications_per_min=1000, device_timeout_s=420, max_retries=1,
                       offline_wait_s=900)
    plan, ok = derive_plan(10_000, spec)
    assert ok and predict_seconds(10_000, plan, spec) <= 0.85 * 3600
    # a slower growth would not fit: the derived plan is the most cautious that does
    slower = WavePlan(canary_pct=1, growth=plan.growth / 1.5)
    assert predict_seconds(10_000, slower, spec) > 0.85 * 3600
    # and the dry run of the derived plan meets the deadline
    res = dry_run(spec, FleetModel(devices=10_000, seed=5))
    assert res.status == "completed" and res.simulated_minutes_to_complete < 60
    assert effective_plan(10_000, spec) == plan
    assert effective_plan(10, RolloutSpec("r")) == WavePlan()
    # 100,000 devices at 1,000 notifications/min cannot be done in an hour
    _, ok = derive_plan(100_000, spec)
    assert not ok


def test_parse_spec_names_bad_keys() -> None:
    spec = parse_spec({"rollout_id": "r", "plan": {"canary": 3}, "gate": {"on_fail": "pause"}})
    assert spec.plan.canary == 3 and spec.gate.on_fail == "pause"
    with pytest.raises(ConfigError) as ei:
        parse_spec({"rollout_id": "r", "plan": {"growth": 0.5}})
    assert ei.value.key == "rollout.plan.growth"
    with pytest.raises(ConfigError) as ei:
        parse_spec({"rollout_id": "r", "gate": {"treshold": 1}})
    assert "treshold" in ei.value.key
    with pytest.raises(ConfigError) as ei:
        parse_spec({"rollout_id": "r", "windows": [{"start": "25:00", "end": "01:00"}]})
    assert ei.value.key == "rollout.windows[0].start"


def test_maintenance_windows() -> None:
    w = [Window("22:00", "02:00")]  # wraps midnight
    assert window_open(w, T0 + 3600)  # 01:00
    assert not window_open(w, T0 + 3 * 3600)
    assert next_open(w, T0 + 3 * 3600) == T0 + 22 * 3600
    assert window_open([], T0)
    # weekdays: T0 is a Thursday (3); a Saturday-only window opens two days later
    sat = [Window("01:00", "02:00", days=[5])]
    assert next_open(sat, T0) == T0 + 2 * 86400 + 3600


def test_state_machine_table() -> None:
    assert allowed(S.QUEUED, S.NOTIFIED) and not allowed(S.QUEUED, S.SUCCEEDED)
    assert not TRANSITIONS[S.ROLLED_BACK] and not TRANSITIONS[S.REJECTED]
    check_transition("d", S.SOAKING, S.SUCCEEDED)
    with pytest.raises(Exception) as ei:
        check_transition("d", S.SUCCEEDED, S.QUEUED)
    assert "SUCCEEDED -> QUEUED" in str(ei.value)


def test_registry_groups_and_health() -> None:
    reg = Registry()
    reg.add("a", {"region": "eu", "hardware": "gw1", "site": "x"})
    reg.add("b", {"region": "us", "hardware": "gw2"})
    reg.add("c", {"region": "eu-west", "hardware": "gw2"}, online=False)
    assert reg.add("a", {"region": "ap"}) == 0  # update, not a duplicate
    assert reg.attrs(0)["region"] == "ap"
    reg.add_group(Group("eu", selector={"region": "eu*"}))
    reg.add_group(Group("gw2", selector={"hardware": ["gw2", "gw3"]}))
    reg.add_group(Group("static", members=("b", "a", "ghost")))
    assert reg.resolve("eu") == [2]
    assert reg.resolve("gw2") == [1, 2]
    assert reg.resolve("static") == [0, 1]
    assert reg.resolve("all") == [0, 1, 2]
    assert Group("x", selector={}).dynamic and not Group("y").dynamic
    with pytest.raises(UnknownGroup):
        reg.resolve("nope")
    reg.add_group(Group("bad", selector={"colour": "red"}))
    with pytest.raises(UnknownGroup):
        reg.resolve("bad")
    with pytest.raises(UnknownDevice):
        reg.index("zz")
    seen: list[int] = []
    reg.on_online.append(seen.append)
    reg.report(2, Health(backlog_bytes=3000, lag_s=4, error_rate=0.5), 1000)
    assert seen == [2]
    s = reg.summary()
    assert s.online == 3 and s.backlog_bytes == 3000 and s.online_pct == 100.0
    reg.report(2, Health(online=False, backlog_bytes=1000), 2000)
    assert reg.export()["online"] == 2 and reg.mean_backlog() == pytest.approx(1000 / 3)
    copy = Registry()
    copy.load_rows(reg.rows())
    assert [r.device_id for r in copy.rows()] == ["a", "b", "c"]
    assert copy.row(2).online is False and copy.row(2).backlog_bytes == 1000
    assert Registry().summary().online_pct == 0.0


def test_protocol_round_trip_and_typed_rejections() -> None:
    msg = JobNotify("r1", "d1", "apply", 2, JobDocument(content="x = 1\n"))
    data = encode(msg)
    assert b'"v":1' in data and b'"kind":"notify"' in data
    assert decode("notify", data) == msg and kind_of(msg) == "notify"
    res = JobResult("d1", "r1", "succeeded", health=Health(backlog_bytes=5))
    assert decode("result", encode(res)) == res
    bad = [("result", b"{not json"), ("result", encode(JobStart("d1"))),
           ("start", b'{"kind":"start","device_id":"d","v":99}'), ("weird", b"{}"),
           ("result", b'{"kind":"result","device_id":"d","job_id":"j","status":"maybe"}')]
    reasons = []
    for kind, payload in bad:
        with pytest.raises(ProtocolError) as ei:
            decode(kind, payload)
        assert isinstance(ei.value, DecodeError)
        reasons.append(ei.value.reason)
    assert reasons == ["malformed", "invalid", "version", "bad_kind", "invalid"]


def test_dry_run_predicts_completion_and_gate_stop() -> None:
    spec = RolloutSpec("dry", plan=WavePlan(canary_pct=2, growth=4), max_in_flight=10_000,
                       max_notifications_per_min=600, soak_s=60, device_timeout_s=400,
                       max_retries=1, offline_wait_s=600, gate=Gate(min_executed=10))
    good = dry_run(spec, FleetModel(devices=1000, failure_rate=0.02, seed=3))
    assert good.status == "completed"
    assert all(g == "passed" for g in good.gate_verdicts)
    assert good.peak_notifications_per_minute <= 600
    assert 10 < good.simulated_minutes_to_complete < 120
    assert summary(good)["succeeded"] > 900
    bad = dry_run(spec, FleetModel(devices=1000, failure_rate=0.3, seed=3))
    assert bad.status == "rolled_back" and bad.gate_verdicts == ["failed"]
    assert bad.states.get("rolled_back", 0) > 0 and bad.rollback_waves >= 1
    assert bad.states["queued"] >= 950  # stopped at the canary


def test_simulation_memory_is_compact() -> None:
    import tracemalloc

    from cloud.fleet.sim import Simulation

    tracemalloc.start()
    sim = Simulation(FleetModel(devices=5000, seed=2))
    spec = RolloutSpec("m", plan=WavePlan(canary_pct=5, growth=4), soak_s=30,
                       max_notifications_per_min=6000, device_timeout_s=400)
    res = sim.run(spec)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert res.status == "completed"
    assert terminal_fraction(sim._rollout) == 1.0
    assert peak / 5000 < 1024  # whole simulation, coordinator included, < 1 KB/device
