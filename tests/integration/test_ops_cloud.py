"""``pymigrate cloud --metrics-port``: the ingest process serves /metrics and /health and
its counters move when a batch arrives."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from agent.status import parse_metrics
from pymigrate.errors import PyMigrateError
from tests.conftest import free_port

pytestmark = pytest.mark.integration


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def _send_junk(port: int) -> None:
    from transports.coap import CoapUplink

    up = CoapUplink(f"coap://127.0.0.1:{port}/ingest", device_id="ops-cloud")
    try:
        with contextlib.suppress(PyMigrateError):
            await up.send(b"not an envelope", batch_id="b1", timeout=5)
    finally:
        await up.close()


def test_cloud_process_metrics(tmp_path: Path) -> None:
    coap, mport = free_port(socket.SOCK_DGRAM), free_port()
    cfg = tmp_path / "cloud.toml"
    cfg.write_text(f"""
[cloud]
store = "sqlite"
listeners = ["coap"]

[cloud.sqlite]
path = "{tmp_path / 'cloud.db'}"

[cloud.coap]
host = "127.0.0.1"
port = {coap}

[log]
level = "warning"
""")
    proc = subprocess.Popen([sys.executable, "-m", "pymigrate.cli", "cloud", "--config",
                             str(cfg), "--metrics-port", str(mport)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{mport}"
    try:
        deadline = time.monotonic() + 20
        while True:  # wait for the process to bind (bounded)
            with contextlib.suppress(OSError):
                code, body = _get(base + "/health")
                if code == 200:
                    break
            assert time.monotonic() < deadline and proc.poll() is None, "cloud did not start"
            time.sleep(0.1)
        doc = json.loads(body)
        assert doc["healthy"] and doc["listeners"] == ["coap"] and doc["store"] == "sqlite"
        before = parse_metrics(_get(base + "/metrics")[1].decode())
        asyncio.run(_send_junk(coap))
        after = parse_metrics(_get(base + "/metrics")[1].decode())
        p = "pymigrate_cloud_"
        assert after[p + "batches_received_total"] == before[p + "batches_received_total"] + 1
        assert sum(after[p + "batches_rejected_total"].values()) == 1
        assert after[p + "process_resident_memory_bytes"] > 0
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
