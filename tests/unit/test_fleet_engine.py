"""Rollout engine on virtual time: waves, gates, soak, timeouts, retries, rollback,
offline devices, windows, pacing, ownership."""

from __future__ import annotations

import itertools
import math

import pytest

from cloud.fleet.protocol import Health, JobResult, JobStart, JobUpdate
from cloud.fleet.spec import Gate, Pacing, RolloutSpec, WavePlan, Window
from cloud.fleet.states import DeviceState, InvalidTransition, NotOwner, UnknownRollout
from tests.unit.test_fleet_helpers import T0, Scripted

S = DeviceState


def spec(**kw: object) -> RolloutSpec:
    base: dict[str, object] = dict(
        rollout_id="r1", plan=WavePlan(canary=10, growth=2.0), max_in_flight=1000,
        max_notifications_per_min=60_000, device_timeout_s=300.0, soak_s=120.0,
        max_retries=1, gate=Gate(success_threshold=0.9, min_executed=5))
    base.update(kw)
    return RolloutSpec(**base)  # type: ignore[arg-type]


def test_happy_path_waves_grow_and_all_succeed_after_soak() -> None:
    f = Scripted(100)
    r = f.start(spec())
    f.run()
    assert r.status == "completed"
    assert r.counts[S.SUCCEEDED] == 100
    assert [w.end - w.start for w in r.waves] == [10, 20, 40, 30]
    assert all(w.gate == "passed" for w in r.waves)
    # every device went queued -> notified -> in_progress -> soaking -> succeeded
    assert len(f.transitions) == 400
    # the second wave starts only after the first one's soak
    second = min(t for t, idx, op, _ in f.sent if r.pos_of[idx] >= 10)
    assert second >= T0 + 60 + 120
    prog = r.progress(f.now)
    assert prog["states"] == {"succeeded": 100}
    assert prog["success_rate"] == 1.0 and prog["eta_s"] == 0.0
    assert next(w["states"] for w in prog["waves"]) == {"succeeded": 10}  # type: ignore[index]


def test_device_counts_as_succeeded_only_after_soak() -> None:
    f = Scripted(10)
    r = f.start(spec(plan=WavePlan(canary=10)))
    f.run(until=T0 + 61)
    assert r.counts[S.SOAKING] == 10 and r.counts[S.SUCCEEDED] == 0
    f.run(until=T0 + 60 + 119)
    assert r.counts[S.SUCCEEDED] == 0
    f.run()
    assert r.counts[S.SUCCEEDED] == 10


def test_bad_health_during_soak_fails_the_device() -> None:
    f = Scripted(20, behaviour=lambda i: "sick" if i in (3, 4) else "ok")
    r = f.start(spec(plan=WavePlan(canary=20)))
    f.run()
    assert r.counts[S.FAILED] == 2
    assert {reason for idx, _, dst, reason in f.transitions if dst == S.FAILED} == {
        "soak_unhealthy"}


def test_success_reported_with_bad_health_is_a_failure() -> None:
    f = Scripted(20, behaviour=lambda i: "unhealthy" if i == 0 else "ok")
    r = f.start(spec(plan=WavePlan(canary=20)))
    f.run()
    assert r.device_state(0) == S.FAILED
    assert r.counts[S.SUCCEEDED] == 19


def test_gate_failure_aborts_and_rolls_back_in_waves() -> None:
    f = Scripted(200, behaviour=lambda i: "fail" if i % 3 == 0 else "ok")
    r = f.start(spec(plan=WavePlan(canary=30), rollback_plan=WavePlan(canary=4, growth=2)))
    f.run()
    assert r.status == "rolled_back" and r.reason == "gate_failed"
    assert r.waves[0].gate == "failed" and len(r.waves) == 1
    # only the canary was touched; the rest never got notified
    assert r.counts[S.QUEUED] == 170
    assert r.counts[S.ROLLED_BACK] == 30
    assert [b - a for a, b in r.rb_waves] == [4, 8, 16, 2]
    rb_sent = [t for t, _, op, _ in f.sent if op == "rollback"]
    assert len(rb_sent) == 30
    # rollback waves are sequential: the second starts after the first finished (5 s)
    assert sorted(rb_sent)[4] >= sorted(rb_sent)[0] + 5


def test_gate_fails_early_when_the_threshold_cannot_be_reached() -> None:
    f = Scripted(100, behaviour=lambda i: "fail" if i < 5 else "ok", dur=60)
    # failures come fast, successes take the soak: the gate must not wait for the soak
    r = f.start(spec(plan=WavePlan(canary=20), gate=Gate(success_threshold=0.8,
                                                        min_executed=5, on_fail="pause")))
    f.run(until=T0 + 61)
    assert r.status == "paused" and r.reason == "gate_failed"


def test_gate_pause_then_resume_forces_next_wave() -> None:
    f = Scripted(60, behaviour=lambda i: "fail" if i < 4 else "ok")
    r = f.start(spec(plan=WavePlan(canary=10), gate=Gate(success_threshold=0.9,
                                                        min_executed=5, on_fail="pause")))
    f.run()
    assert r.status == "paused" and r.waves[0].gate == "failed"
    assert r.counts[S.QUEUED] == 50
    r.resume(f.now)
    f.run()
    assert r.waves[0].gate == "forced"
    assert r.status == "completed" and r.counts[S.SUCCEEDED] == 56


def test_gate_needs_minimum_executed_devices() -> None:
    f = Scripted(3)
    r = f.start(spec(plan=WavePlan(canary=3), gate=Gate(min_executed=5)))
    f.run()
    assert r.status == "paused" and r.reason == "insufficient_evidence"
    assert r.gate_verdict(0) == "insufficient"


def test_small_wave_uses_cumulative_evidence() -> None:
    f = Scripted(23)
    r = f.start(spec(plan=WavePlan(canary=20, growth=2), gate=Gate(min_executed=10)))
    f.run()
    assert r.status == "completed"
    assert [w.end - w.start for w in r.waves] == [20, 3]


def test_timeout_then_retry_then_final_timeout() -> None:
    f = Scripted(10, behaviour=lambda i: "hang" if i == 0 else "ok")
    r = f.start(spec(plan=WavePlan(canary=10), max_retries=2, device_timeout_s=100,
                     gate=Gate(success_threshold=0.5, min_executed=5)))
    f.run()
    assert r.device_state(0) == S.TIMED_OUT
    assert r.attempts[r.pos_of[0]] == 2
    sent0 = [(t, a) for t, idx, op, a in f.sent if idx == 0]
    assert [a for _, a in sent0] == [0, 1, 2]
    assert sent0[1][0] - sent0[0][0] == pytest.approx(100, abs=1)
    assert [dst for idx, _, dst, _ in f.transitions if idx == 0].count(S.TIMED_OUT) == 3


def test_no_retry_of_timeouts_when_disabled() -> None:
    f = Scripted(10, behaviour=lambda i: "hang" if i == 0 else "ok")
    r = f.start(spec(plan=WavePlan(canary=10), retry_timeouts=False,
                     gate=Gate(success_threshold=0.5, min_executed=5)))
    f.run()
    assert r.device_state(0) == S.TIMED_OUT and r.attempts[r.pos_of[0]] == 0


def test_retriable_failures_are_retried_non_retriable_are_not() -> None:
    f = Scripted(10, behaviour=lambda i: {0: "retry", 1: "fail"}.get(i, "ok"))
    r = f.start(spec(plan=WavePlan(canary=10), max_retries=3,
                     gate=Gate(success_threshold=0.5, min_executed=5)))
    f.run()
    assert r.attempts[r.pos_of[0]] == 3 and r.device_state(0) == S.FAILED
    assert r.attempts[r.pos_of[1]] == 0 and r.device_state(1) == S.FAILED
    assert r.status == "completed"


def test_rejected_counts_against_the_gate() -> None:
    f = Scripted(10, behaviour=lambda i: "reject" if i < 3 else "ok")
    r = f.start(spec(plan=WavePlan(canary=10), gate=Gate(success_threshold=0.9,
                                                        min_executed=5)))
    f.run()
    assert r.status == "rolled_back"
    # the second rejection already makes 90 % unreachable: abort at once; rejected
    # devices never applied anything and are not rolled back, the third (still in
    # progress at the abort) is
    assert r.counts[S.REJECTED] == 2 and r.counts[S.ROLLED_BACK] == 8


def test_offline_devices_wait_then_are_skipped_and_reported() -> None:
    f = Scripted(20, offline={2, 3})
    r = f.start(spec(plan=WavePlan(canary=20), offline_wait_s=600))
    f.push(T0 + 300, "online", 2)  # device 2 comes back and pulls
    f.run()
    assert r.status == "completed"
    assert r.device_state(2) == S.SUCCEEDED
    assert r.device_state(3) == S.SKIPPED
    skip = [reason for idx, _, dst, reason in f.transitions if dst == S.SKIPPED]
    assert skip == ["offline"]
    assert f.now >= T0 + 600
    assert not [1 for _, idx, _, _ in f.sent if idx == 3]  # never notified while offline


def test_offline_device_does_not_block_the_gate() -> None:
    f = Scripted(40, offline={0})
    r = f.start(spec(plan=WavePlan(canary=10), offline_wait_s=10_000))
    f.run(until=T0 + 1000)
    assert len(r.waves) >= 2 and r.waves[0].gate == "passed"
    assert r.progress(f.now)["waves"][0]["offline_waiting"] == 1  # type: ignore[index]


def test_max_in_flight_is_respected() -> None:
    f = Scripted(50)
    r = f.start(spec(plan=WavePlan(canary=50), max_in_flight=7))
    peak = 0
    while not r.done:
        f.run(until=f.now + 1)
        peak = max(peak, r.in_flight)
    assert peak == 7
    assert r.counts[S.SUCCEEDED] == 50


def test_notification_rate_cap_holds_in_every_sliding_minute() -> None:
    f = Scripted(400, dur=30)
    r = f.start(spec(plan=WavePlan(canary=400), max_notifications_per_min=120, soak_s=10))
    f.run()
    times = sorted(t for t, *_ in f.sent)
    worst = max(sum(1 for u in times if t <= u < t + 60) for t in times)
    assert worst <= 120
    assert worst >= 110  # and the cap is actually used
    assert r.status == "completed"


def test_maintenance_window_defers_notifications() -> None:
    f = Scripted(10)
    # T0 is 00:00 UTC; the window opens at 02:00
    r = f.start(spec(plan=WavePlan(canary=10), windows=[Window("02:00", "03:00")]))
    f.run()
    first = min(t for t, *_ in f.sent)
    assert first == T0 + 2 * 3600
    assert r.status == "completed"


def test_backpressure_slows_notifications_and_shrinks_next_wave() -> None:
    f = Scripted(400, dur=30)
    r = f.start(spec(plan=WavePlan(canary=20, growth=4), max_notifications_per_min=600,
                     soak_s=10, pacing=Pacing(max_ingest_lag_s=5, recover_s=3600)))
    f.core.report_ingest(f.now, lag_s=60)  # ingest is 60 s behind
    f.core.report_ingest(f.now, throttled=True)
    assert r.pacer.backpressure_events == 2
    f.run(until=T0 + 200)
    assert r.waves[1].planned == 80
    assert r.waves[1].end - r.waves[1].start < 80  # shrunk by the back-pressure factor
    f.core.report_ingest(f.now, lag_s=1)  # below the limit: no effect
    assert r.pacer.backpressure_events == 2


def test_ingest_budget_caps_rate_and_wave_size() -> None:
    f = Scripted(100, dur=30)
    for i in range(100):
        f.reg.report(i, Health(backlog_bytes=100_000), 0)
    # 100 kB of catch-up upload per device, 100 kB/s budget: one device per second,
    # a tenth of the configured 600/min, so the 100-device wave shrinks to 10
    r = f.start(spec(plan=WavePlan(canary=100), max_notifications_per_min=601, soak_s=1,
                     pacing=Pacing(ingest_budget_bytes_per_s=100_000, min_factor=0.01)))
    f.run(until=T0 + 9.5)
    assert r.waves[0].end - r.waves[0].start == 10
    times = [t for t, *_ in f.sent]
    assert len(times) == 10
    assert min(b - a for a, b in itertools.pairwise(times)) == pytest.approx(1.0, abs=0.01)
    assert r.pacer.budget_rate_per_s(100_000) == pytest.approx(1.0)
    assert r.pacer.budget_rate_per_s(0) == math.inf


def test_rollback_failure_and_rollback_timeout() -> None:
    f = Scripted(20, behaviour=lambda i: {0: "fail", 1: "fail", 2: "fail", 3: "rbfail"}.get(
        i, "ok"))
    r = f.start(spec(plan=WavePlan(canary=20), gate=Gate(success_threshold=0.95,
                                                        min_executed=5),
                     rollback_plan=WavePlan(canary=100)))
    f.run()
    # a failed rollback is FAILED with its reason and pauses the rollback gate? 1/17 < 5%
    assert r.status == "rolled_back"
    rb_failed = [reason for idx, src, dst, reason in f.transitions
                 if src == S.ROLLING_BACK and dst == S.FAILED]
    assert rb_failed == [""]
    f2 = Scripted(20, behaviour=lambda i: "fail" if i < 5 else ("mute" if i < 9 else "ok"))
    r2 = f2.start(spec(plan=WavePlan(canary=20), device_timeout_s=50,
                       gate=Gate(success_threshold=0.9, min_executed=5),
                       rollback_plan=WavePlan(canary=100)))
    f2.run()
    reasons = {reason for _, src, dst, reason in f2.transitions if src == S.ROLLING_BACK}
    assert "rollback_timeout" in reasons
    assert r2.status == "paused" and r2.reason == "rollback_gate_failed"


def test_operator_abort_cancel_and_pause() -> None:
    f = Scripted(50)
    r = f.start(spec(plan=WavePlan(canary=10)))
    f.run(until=T0 + 30)
    r.pause()
    assert r.status == "paused"
    r.pause()  # idempotent
    r.resume(f.now)
    r.abort(f.now, reason="operator_abort")
    r.abort(f.now)  # idempotent
    f.run()
    assert r.status == "rolled_back" and r.counts[S.ROLLED_BACK] == 10
    r.resume(f.now)  # no effect once done
    f2 = Scripted(50)
    r2 = f2.start(spec(plan=WavePlan(canary=10)))
    f2.run(until=T0 + 30)
    r2.cancel(f2.now)
    f2.run()
    assert r2.status == "cancelled" and r2.counts[S.QUEUED] == 40


def test_ownership_and_stale_messages() -> None:
    f = Scripted(10)
    f.reg.add("outsider")
    r = f.start(spec(plan=WavePlan(canary=10), group="all"))
    with pytest.raises(NotOwner):
        f.core.handle("d1", JobResult("d2", "r1", "succeeded"), f.now)  # spoofed id
    with pytest.raises(NotOwner):
        f.core.handle("d1", JobResult("d1", "nope", "succeeded"), f.now)  # unknown job
    with pytest.raises(NotOwner):
        f.core.handle("ghost", JobStart("ghost", "r1"), f.now)  # unknown device
    with pytest.raises(NotOwner):
        f.core.handle("d1", JobUpdate("d1", "nope", health=Health()), f.now)
    with pytest.raises(UnknownRollout):
        f.core.get("nope")
    # a stale attempt is ignored and counted
    f.run(until=T0 + 2)
    f.core.handle("d1", JobResult("d1", "r1", "succeeded", attempt=7), f.now)
    assert r.stale == 1 and r.device_state(1) == S.IN_PROGRESS


def test_pull_resends_pending_job() -> None:
    f = Scripted(5, behaviour=lambda i: "mute")
    r = f.start(spec(plan=WavePlan(canary=5), gate=Gate(min_executed=1)))
    f.run(until=T0 + 1)
    assert len(f.sent) == 5
    f.core.handle("d0", JobStart("d0"), f.now)  # reconnect -> pull
    assert f.sent[-1][1:] == (0, "apply", 0)
    assert r.on_pull(0, f.now) == "apply"


def test_invalid_transition_is_rejected_with_typed_error() -> None:
    f = Scripted(3)
    r = f.start(spec(plan=WavePlan(canary=3), gate=Gate(min_executed=1)))
    with pytest.raises(InvalidTransition) as ei:
        r._set(0, S.SUCCEEDED, f.now)
    assert ei.value.reason == "invalid_transition"
    assert r.device_state(0) == S.NOTIFIED


def test_dynamic_group_targets_only_matching_devices() -> None:
    from cloud.fleet.registry import Group

    f = Scripted(10)
    f.reg.add_group(Group("eu", selector={"region": "eu"}))
    r = f.start(spec(group="eu", plan=WavePlan(canary=5), gate=Gate(min_executed=2)))
    f.run()
    assert r.n == 5 and r.counts[S.SUCCEEDED] == 5
    assert {f.reg.ids[i] for i in r.targets} == {"d1", "d3", "d5", "d7", "d9"}


def test_next_deadline_is_infinite_when_only_events_can_help() -> None:
    f = Scripted(3, behaviour=lambda i: "mute")
    r = f.start(spec(plan=WavePlan(canary=3), device_timeout_s=1e9, offline_wait_s=1e9))
    f.run(until=T0 + 1)
    assert r.in_flight == 3
    assert r._next_dispatch == math.inf  # nothing queued: no dispatch timer
    assert r.next_deadline() == pytest.approx(T0 + 1e9, rel=1e-3)  # only the timeouts


def test_advance_fraction_starts_next_wave_early_and_keeps_watching() -> None:
    # half of the canary is fast, half slow: with advance_fraction=0.5 the next wave
    # starts once the fast half passed, without waiting for the slow half
    f = Scripted(60)
    f.dur = 60
    slow = set(range(5, 10))
    orig = f.notify

    def notify(rollout, idx, op, attempt):  # type: ignore[no-untyped-def]
        if idx in slow and op == "apply":
            f.sent.append((f.now, idx, op, attempt))
            f.push(f.now + 1, "start", idx, attempt)
            f.push(f.now + 1000, "ok", idx, attempt)
            return
        orig(rollout, idx, op, attempt)

    f.notify = notify  # type: ignore[method-assign]
    r = f.start(spec(plan=WavePlan(canary=10), soak_s=10, device_timeout_s=2000,
                     gate=Gate(success_threshold=0.9, min_executed=5, advance_fraction=0.5)))
    f.run(until=T0 + 200)
    assert r.waves[0].gate == "passed" and len(r.waves) >= 2
    f.run()
    assert r.status == "completed"


def test_early_passed_wave_that_degrades_aborts_the_rollout() -> None:
    # the slow half of the canary fails after the wave already passed on its fast half
    f = Scripted(60, behaviour=lambda i: "fail" if 5 <= i < 10 else "ok")
    f.dur = 60
    orig = f.notify

    def notify(rollout, idx, op, attempt):  # type: ignore[no-untyped-def]
        if 5 <= idx < 10 and op == "apply":
            f.sent.append((f.now, idx, op, attempt))
            f.push(f.now + 500, "fail", idx, attempt)
            return
        orig(rollout, idx, op, attempt)

    f.notify = notify  # type: ignore[method-assign]
    r = f.start(spec(plan=WavePlan(canary=10), soak_s=10, max_retries=0,
                     gate=Gate(success_threshold=0.9, min_executed=5, advance_fraction=0.5)))
    f.run()
    assert r.waves[0].gate == "failed" and len(r.waves) >= 2
    assert r.status == "rolled_back" and r.reason == "gate_failed"
