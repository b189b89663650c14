"""Short chaos run: 3 real agents, brokers we restart, the ingest on PostgreSQL, the fault
proxy; every fault kind at least once; the audit must find nothing lost or duplicated
outside the documented eviction (LOW data over budget) and quarantine (a corrupted chunk).
"""

from __future__ import annotations

import os

import pytest

from tests.conftest import require_binary, require_service

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def test_chaos_short_exactly_once(tmp_path: object) -> None:
    require_binary("mosquitto")
    require_service("PostgreSQL", "127.0.0.1", 5432)
    from bench.chaos import FAULTS, run_chaos

    dsn = os.environ.get("PYMIGRATE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
    res = await run_chaos(minutes=0.75, seed=11, devices=3, rate=5, pg_dsn=dsn,
                          min_each=1, burst=30000, drain_s=60.0)
    assert {k: res["faults"][k] >= 1 for k in FAULTS} == {k: True for k in FAULTS}, res
    assert res["pending_chunks_at_end"] == 0, res
    assert res["lost"] == 0, res
    assert res["duplicated"] == 0, res
    assert res["unknown_in_store"] == 0, res
    # the quota fill really evicted (LOW only), and the corrupted chunk was quarantined
    assert set(res["evicted_by_policy"]) <= {"low"}, res
    assert res["agent_evicted_readings_logged"].get("low", 0) > 0, res
    assert res["agent_quarantine_events"] >= 1, res
    assert res["quarantined_readings"] >= 1, res
    assert res["stored_distinct"] + sum(res["evicted_by_policy"].values()) \
        + res["quarantined_readings"] == res["produced"], res
