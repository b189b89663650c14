"""One TOML for a real ``pymigrate agent`` + ``pymigrate cloud`` pair on loopback CoAP into
SQLite, shared by the process-level tests (kill -9, completeness, shared device ids)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path


def spawn(*args: str) -> subprocess.Popen[bytes]:
    """``python -m pymigrate.cli ARGS`` with its output (stdout and stderr) piped."""
    return subprocess.Popen([sys.executable, "-m", "pymigrate.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for(pred: object, timeout: float) -> bool:
    """Poll ``pred()`` every 50 ms until true or ``timeout`` seconds passed."""
    assert callable(pred)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


def cloud_rows(db: Path) -> int:
    """Readings in the cloud's SQLite store (0 before its schema exists). The running
    agent holds its buffer exclusively, so process tests watch progress here."""
    con = sqlite3.connect(db)
    try:
        return int(con.execute("SELECT count(*) FROM readings").fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        con.close()


def agent_cloud_toml(tmp: Path, port: int, *, device: str, data_dir: str, source: str,
                     buffer: str = "", retry: str = "backoff_cap_s = 0.3",
                     pipeline: str = "") -> str:
    """``source``: the ``[[sources]]`` body; ``buffer``/``retry``/``pipeline``: extra keys."""
    return f"""
[device]
id = "{device}"
data_dir = "{tmp / data_dir}"

[[sources]]
{source}

[buffer]
commit_window_ms = 20
chunk_max_age_s = 0.3
{buffer}

[uplink]
transports = ["coap"]

[uplink.coap]
host = "127.0.0.1"
port = {port}

[retry]
backoff_base_s = 0.05
{retry}

[pipeline]
{pipeline}

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
"""
