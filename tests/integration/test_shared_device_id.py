"""Two gateways configured with one device id (a cloned config, the default id left in
place) into one cloud: each agent's readings are stored exactly once, as two streams.

Real processes: two ``pymigrate agent`` (each replaying its own CSV, so the test knows
every value each one produced) and one ``pymigrate cloud`` (CoAP into SQLite).
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.support.agent_cloud import agent_cloud_toml
from tests.support.agent_cloud import spawn as _spawn
from tests.support.agent_cloud import wait_for as _wait_for

pytestmark = pytest.mark.integration
N = 1500  # rows per agent, 2 sensors each


def _files(tmp: Path, name: str, port: int, base: float) -> Path:
    t0 = int(time.time() * 1000) - 3_600_000
    csv = tmp / f"{name}.csv"
    csv.write_text("ts,a,b\n" + "".join(f"{t0 + i * 1000},{base + i},{base - i}\n"
                                         for i in range(N)))
    cfg = tmp / f"{name}.toml"
    cfg.write_text(agent_cloud_toml(tmp, port, device="cloned-gw", data_dir=name,
                                    source=f'type = "replay"\npath = "{csv}"\nspeed = 0'))
    return cfg


def _stored_values(db: Path) -> list[float]:
    con = sqlite3.connect(db)
    try:
        return [r[0] for r in con.execute(
            "SELECT value FROM readings WHERE device_id = 'cloned-gw'")]
    except sqlite3.OperationalError:  # the cloud is still creating its tables
        return []
    finally:
        con.close()


def test_two_gateways_sharing_an_id_are_each_stored_once(tmp_path: Path) -> None:
    port = free_port()
    cfg_a = _files(tmp_path, "gw-a", port, 1_000_000.0)
    cfg_b = _files(tmp_path, "gw-b", port, 5_000_000.0)
    cloud = _spawn("cloud", "--config", str(cfg_a))
    agents: list[subprocess.Popen[bytes]] = []
    try:
        assert _wait_for(lambda: (tmp_path / "cloud.db").exists(), 20), "cloud did not start"
        agents = [_spawn("agent", "--config", str(c)) for c in (cfg_a, cfg_b)]
        assert _wait_for(lambda: len(_stored_values(tmp_path / "cloud.db")) >= 4 * N, 60), \
            f"stored {len(_stored_values(tmp_path / 'cloud.db'))} of {4 * N}"
        for a in agents:
            a.send_signal(signal.SIGTERM)
        for a in agents:
            out, _ = a.communicate(timeout=60)
            assert a.returncode == 0, out.decode(errors="replace")[-2000:]
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
        cloud.send_signal(signal.SIGTERM)
        try:
            cloud.wait(20)
        except subprocess.TimeoutExpired:
            cloud.kill()
    values = sorted(_stored_values(tmp_path / "cloud.db"))
    produced = sorted([1_000_000.0 + i for i in range(N)] + [1_000_000.0 - i for i in range(N)]
                      + [5_000_000.0 + i for i in range(N)] + [5_000_000.0 - i for i in range(N)])
    assert values == produced  # every reading of both gateways, each exactly once
    res = subprocess.run([sys.executable, "-m", "pymigrate.cli", "cloud", "completeness",
                          "cloned-gw", "--config", str(cfg_a), "--json"],
                         capture_output=True, timeout=60)
    assert res.returncode == 0, res.stdout.decode() + res.stderr.decode()
    (dev,) = json.loads(res.stdout)["devices"]
    assert dev["instances"] == 2 and dev["stored"] == 4 * N
    assert dev["unexplained"] == 0 and dev["duplicates"] == 0 and dev["conflicts"] == 0
