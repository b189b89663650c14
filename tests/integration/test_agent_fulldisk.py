"""The agent on a real, small, full filesystem (issue 15's "done when"), with real
``pymigrate agent`` and ``pymigrate cloud`` processes on a tmpfs the test mounts (root
only, as CI runs; skipped with the reason otherwise). The sequence is the one
``python -m bench fulldisk`` measures, at a smaller size so it runs in well under a
minute: fill the budget offline, another process fills the filesystem, ``kill -9``,
restart on the full filesystem, space and cloud return, drain, SIGTERM.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_full_disk_agent_stays_up_restarts_drains_and_loses_nothing(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    from bench.fulldisk import run

    budget = 512 * 1024
    res = run(1024 * 1024, budget, fill_timeout_s=90, work=tmp_path)
    # within the budget: bounded, no "disk is full", eviction counted
    assert res["state_dir_peak_bytes"] <= budget * 1.10, res
    assert res["disk_is_full_log_lines_within_budget"] == 0, res
    assert res["evicted_readings"] > 0
    # another process fills the filesystem: up, unhealthy with the reason
    assert res["unhealthy_when_full"] and res["health_status_when_full"] == "disk_full", res
    assert res["agent_alive_on_full"], res
    # kill -9, restart on the full filesystem
    assert res["restart_on_full_ok"], res
    # space and cloud return: drains, stops within 20 s of SIGTERM
    assert res["drain_after_free_s"] is not None, res
    assert res["sigterm_rc"] == 0 and res["sigterm_exit_s"] <= 20, res
    assert res["task_deaths"] == 0, res
    # the completeness ledger: every number stored once or accounted for by a gap
    assert res["unexplained"] == 0 and res["duplicates"] == 0, res
    assert res["stored"] + res["gap_readings"] == res["max_seq"], res
