"""The completeness ledger through ``kill -9``: an offline agent that must evict is killed
five times, then the cloud comes up and the agent drains. ``pymigrate cloud
completeness --json`` must then account for every sequence number the agent issued:
stored + gaps = max_seq, nothing unexplained, nothing stored twice, the evictions named
as such, and its ``stored`` equal to what the store holds.

Real processes: ``pymigrate agent`` (replaying 60,000 incompressible readings as fast
as it can, a 512 KiB buffer budget) and ``pymigrate cloud`` (CoAP on loopback into SQLite).
"""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.support.agent_cloud import agent_cloud_toml
from tests.support.agent_cloud import cloud_rows as _stored
from tests.support.agent_cloud import spawn as _spawn
from tests.support.agent_cloud import wait_for as _wait_for

pytestmark = pytest.mark.integration


def _dataset(tmp: Path) -> Path:
    """Incompressible values (so a small budget fills), timestamps in the last hour."""
    rnd = random.Random(5)
    t0 = int(time.time() * 1000) - 3_600_000
    path = tmp / "noise.csv"
    lines = ["ts," + ",".join(f"s{j}" for j in range(20))]
    lines += [f"{t0 + i * 100}," + ",".join(f"{rnd.uniform(-1e6, 1e6):.6f}" for _ in range(20))
              for i in range(3000)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _config(tmp: Path, port: int) -> Path:
    csv = _dataset(tmp)
    cfg = tmp / "agent.toml"
    cfg.write_text(agent_cloud_toml(
        tmp, port, device="ledger-dev", data_dir="var",
        source=f'type = "replay"\npath = "{csv}"\nspeed = 0',
        buffer="budget_bytes = 524288",  # 256 KiB (the minimum) holds barely a chunk
        retry="backoff_cap_s = 0.3\nbreaker_open_base_s = 0.2\nbreaker_open_cap_s = 0.5",
        pipeline="drain_timeout_s = 20.0"))
    return cfg


def _high_water(db: Path) -> int:
    con = sqlite3.connect(db)
    try:
        row = con.execute("SELECT next_seq FROM seqs WHERE device_id = 'ledger-dev'").fetchone()
    finally:
        con.close()
    return int(row[0]) - 1 if row else 0


def test_offline_evicting_agent_killed_five_times_is_fully_accounted(tmp_path: Path) -> None:
    port = free_port()
    cfg = _config(tmp_path, port)
    buffer_db = tmp_path / "var" / "buffer.db"
    rng = random.Random(16)
    for _ in range(5):  # offline: no cloud is listening, the budget must evict
        agent = _spawn("agent", "--config", str(cfg))
        if not _wait_for(lambda: buffer_db.exists(), 20):
            agent.kill()
            raise AssertionError(agent.communicate()[0].decode(errors="replace")[-3000:])
        time.sleep(rng.uniform(1.0, 2.0))
        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
    offline_high = _high_water(buffer_db)
    con = sqlite3.connect(buffer_db)
    pending_gaps = con.execute("SELECT count(*) FROM gaps").fetchone()[0]
    con.close()
    assert pending_gaps > 0, "the budget should have forced evictions while offline"
    cloud = _spawn("cloud", "--config", str(cfg))
    try:
        assert _wait_for(lambda: (tmp_path / "cloud.db").exists(), 20), "cloud did not start"
        agent = _spawn("agent", "--config", str(cfg))
        # the buffer is held exclusively while the agent runs: watch the cloud instead
        assert _wait_for(lambda: _stored(tmp_path / "cloud.db") > 0, 30)
        time.sleep(2.0)
        agent.send_signal(signal.SIGTERM)
        out, _ = agent.communicate(timeout=60)
        assert agent.returncode == 0, out.decode(errors="replace")[-2000:]
    finally:
        cloud.send_signal(signal.SIGTERM)
        try:
            cloud.wait(20)
        except subprocess.TimeoutExpired:
            cloud.kill()
    high = _high_water(buffer_db)
    assert high > offline_high
    res = subprocess.run([*_spawn_args(), "cloud", "completeness", "ledger-dev", "--config",
                          str(cfg), "--json"], capture_output=True, timeout=60)
    assert res.returncode == 0, res.stdout.decode() + res.stderr.decode()
    doc = json.loads(res.stdout)
    (dev,) = doc["devices"]
    assert dev["instances"] == 1
    assert dev["max_seq"] == high  # the agent's own count of what it issued
    assert dev["unexplained"] == 0 and dev["duplicates"] == 0 and dev["conflicts"] == 0
    assert dev["gaps"].get("evicted", 0) > 0
    assert dev["stored"] + dev["gap_total"] == dev["max_seq"]
    con = sqlite3.connect(tmp_path / "cloud.db")
    try:
        n, distinct = con.execute("SELECT count(*), count(DISTINCT seq) FROM readings "
                                  "WHERE device_id = 'ledger-dev'").fetchone()
    finally:
        con.close()
    assert n == distinct == dev["stored"]


def _spawn_args() -> list[str]:
    import sys

    return [sys.executable, "-m", "pymigrate.cli"]
