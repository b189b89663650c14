"""No accepted reading is lost across repeated ``kill -9`` of the agent process.

Real processes: ``pymigrate cloud`` (CoAP on loopback into SQLite) and ``pymigrate agent``
(simulated weather station at 100 Hz x 5 sensors). The agent is SIGKILLed at random
moments, restarted each time, and finally stopped gracefully. Every sequence number the
buffer ever committed (its persisted counter) must then be in the cloud store exactly once.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.integration

PY = sys.executable


def _config(tmp: Path, port: int) -> Path:
    cfg = tmp / "agent.toml"
    cfg.write_text(f"""
[device]
id = "kill9-dev"
data_dir = "{tmp / 'var'}"

[[sources]]
type = "weather"
sensors = 5
interval_s = 0.01

[buffer]
commit_window_ms = 20
chunk_max_age_s = 0.3

[uplink]
transports = ["coap"]

[uplink.coap]
host = "127.0.0.1"
port = {port}

[retry]
backoff_base_s = 0.05
backoff_cap_s = 0.5

[pipeline]
drain_timeout_s = 15.0

[log]
level = "warning"

[cloud]
store = "sqlite"
listeners = ["coap"]

[cloud.sqlite]
path = "{tmp / 'cloud.db'}"

[cloud.coap]
host = "127.0.0.1"
port = {port}
""")
    return cfg


def _spawn(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([PY, "-m", "pymigrate.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _wait_for(pred: object, timeout: float) -> bool:
    assert callable(pred)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


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
        def cloud_rows() -> int:
            con = sqlite3.connect(tmp_path / "cloud.db")
            try:
                return int(con.execute("SELECT count(*) FROM readings").fetchone()[0])
            except sqlite3.OperationalError:
                return 0
            finally:
                con.close()

        rows = cloud_rows()  # the buffer is held exclusively while the agent runs
        assert _wait_for(lambda: cloud_rows() > rows, 30)
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
