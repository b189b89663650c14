"""Signals: the first SIGTERM stops gracefully (drain within the deadline), a second one
forces the stop at once; nothing accepted is lost either way."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.integration.test_agent_kill9 import _committed_high_water, _config
from tests.support.agent_cloud import spawn as _spawn
from tests.support.agent_cloud import wait_for as _wait_for

pytestmark = pytest.mark.integration


def test_second_signal_forces_stop(tmp_path: Path) -> None:
    cfg = _config(tmp_path, free_port())  # nobody listens: the uploader cannot deliver
    cfg.write_text(cfg.read_text().replace("drain_timeout_s = 15.0", "drain_timeout_s = 60.0"))
    agent = _spawn("agent", "--config", str(cfg))
    buffer_db = tmp_path / "var" / "buffer.db"
    assert _wait_for(lambda: buffer_db.exists(), 20)
    time.sleep(1.0)
    agent.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert agent.poll() is None  # still draining (the uplink is down, deadline 60 s)
    t0 = time.monotonic()
    agent.send_signal(signal.SIGTERM)
    try:
        agent.wait(15)
    except subprocess.TimeoutExpired:
        agent.kill()
        pytest.fail("second SIGTERM did not force the stop")
    assert time.monotonic() - t0 < 15
    assert agent.returncode != 0  # a forced stop is not a clean stop
    # everything accepted is still in the buffer, sealed or staged, for the next start
    high = _committed_high_water(buffer_db)
    assert high > 0
    con = sqlite3.connect(buffer_db)
    try:
        sealed = con.execute("SELECT COALESCE(SUM(count), 0) FROM chunks").fetchone()[0]
    finally:
        con.close()
    assert sealed > 0
