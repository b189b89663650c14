"""One TOML for a real ``pymigrate agent`` + ``pymigrate cloud`` pair on loopback CoAP into
SQLite, shared by the process-level tests (kill -9, completeness, shared device ids)."""

from __future__ import annotations

from pathlib import Path


def agent_cloud_toml(tmp: Path, port: int, *, device: str, data_dir: str, source: str,
                     buffer: str = "", retry: str = "", pipeline: str = "") -> str:
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
backoff_cap_s = 0.3
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
