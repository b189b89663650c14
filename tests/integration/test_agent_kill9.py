"""No accepted reading is lost across repeated ``kill -9`` of the agent process.

Real processes: ``pymigrate cloud`` (CoAP on loopback into SQLite) and ``pymigrate agent``
(simulated weather station at 100 Hz x 5 sensors). The agent is SIGKILLed at random
moments, restarted each time, and finally stopped gracefully. Every sequence number the
buffer ever committed (its persisted counter) must then be in the cloud store exactly once.
"""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.support.agent_cloud import agent_cloud_toml, cloud_rows
from tests.support.agent_cloud import spawn as _spawn
from tests.support.agent_cloud import wait_for as _wait_for

pytestmark = pytest.mark.integration



def _config(tmp: Path, port: int) -> Path:
    cfg = tmp / "agent.toml"
    cfg.write_text(agent_cloud_toml(
        tmp, port, device="kill9-dev", data_dir="var",
        source='type = "weather"\nsensors = 5\ninterval_s = 0.01',
        retry="backoff_cap_s = 0.5", pipeline="drain_timeout_s = 15.0"))
    return cfg


def _committed_high_water(db: Path) -> int:
    con = sqlite3.connect(db)
    try:
        row = con.execute("SELECT next_seq FROM seqs WHERE device_id = 'kill9-dev'").fetchone()
    finally:
        con.close()
    return int(row[0]) - 1 if row else 0


def test_kill9_loses_nothing(tmp_path: Path) -> None:
    port = free_port()
    cfg = _config(tmp_path, port)
    cloud = _spawn("cloud", "--config", str(cfg))
    rng = random.Random(1234)
    try:
        assert _wait_for(lambda: (tmp_path / "cloud.db").exists(), 20), "cloud did not start"
        buffer_db = tmp_path / "var" / "buffer.db"
        kills = 0
        for _ in range(5):
            agent = _spawn("agent", "--config", str(cfg))
            if not _wait_for(lambda: buffer_db.exists(), 20):
                agent.kill()
                raise AssertionError(agent.communicate()[0].decode(errors="replace")[-3000:])
            time.sleep(rng.uniform(0.8, 2.0))
            agent.send_signal(signal.SIGKILL)
            agent.wait(10)
            kills += 1
        assert kills == 5
        before_final = _committed_high_water(buffer_db)
        assert before_final > 0
        agent = _spawn("agent", "--config", str(cfg))
        # signal handlers are installed before the first reading is accepted: wait for
        # that (a fixed sleep raced a slow start under load)
        store = tmp_path / "cloud.db"
        rows = cloud_rows(store)  # the buffer is held exclusively while the agent runs
        assert _wait_for(lambda: cloud_rows(store) > rows, 30)
        time.sleep(0.5)
        agent.send_signal(signal.SIGTERM)
        out, _ = agent.communicate(timeout=60)
        assert agent.returncode == 0, out.decode(errors="replace")[-2000:]
        high = _committed_high_water(buffer_db)
        assert high > before_final
        con = sqlite3.connect(tmp_path / "cloud.db")
        try:
            seqs = [r[0] for r in con.execute(
                "SELECT seq FROM readings WHERE device_id = 'kill9-dev' ORDER BY seq")]
        finally:
            con.close()
        assert len(seqs) == len(set(seqs))
        missing = sorted(set(range(1, high + 1)) - set(seqs))
        assert missing == [], f"{len(missing)} accepted readings lost, first {missing[:10]}"
        assert seqs[-1] == high  # nothing stored that was never accepted
    finally:
        cloud.send_signal(signal.SIGTERM)
        try:
            cloud.wait(20)
        except subprocess.TimeoutExpired:
            cloud.kill()
