"""`pymigrate run` and `pymigrate cloud` in-process: the embedded default end to end."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from pymigrate.cli import main
from tests.conftest import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _config(tmp: Path, port: int) -> Path:
    text = (ROOT / "configs" / "default.toml").read_text()
    text = text.replace('data_dir = "./var"', f'data_dir = "{tmp / "var"}"')
    text = text.replace('path = "./var/cloud.db"', f'path = "{tmp / "var" / "cloud.db"}"')
    text = text.replace("port = 5683", f"port = {port}")
    text = text.replace("port = 9108", "port = 0")  # metrics: any free port
    text = text.replace("interval_s = 1.0", "interval_s = 0.05")
    text = text.replace("chunk_max_age_s = 10.0", "chunk_max_age_s = 0.5")
    text = text.replace("status_interval_s = 5.0", "status_interval_s = 0.5")
    cfg = tmp / "run.toml"
    cfg.write_text(text)
    return cfg


def test_run_delivers_everything_it_accepted(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, free_port())
    assert main(["run", "--config", str(cfg), "--duration", "2.5"]) == 0
    out = capsys.readouterr().out
    assert "accepted=" in out and "stored_in_cloud=" in out
    last = out.strip().splitlines()[-1]
    fields = dict(kv.split("=") for kv in last.split()[1:])
    assert int(fields["accepted"]) > 50
    assert fields["accepted"] == fields["delivered"] == fields["stored_in_cloud"]
    con = sqlite3.connect(tmp_path / "var" / "cloud.db")
    try:
        n, lo, hi = con.execute("SELECT COUNT(*), MIN(seq), MAX(seq) FROM readings").fetchone()
    finally:
        con.close()
    assert (n, lo, hi) == (int(fields["accepted"]), 1, int(fields["accepted"]))


def test_cloud_check_config_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, free_port())
    assert main(["cloud", "--check-config", "--config", str(cfg)]) == 0
    bad = tmp_path / "bad.toml"
    bad.write_text('[cloud]\nstore = "oracle"\n')
    assert main(["cloud", "--check-config", "--config", str(bad)]) == 2
    assert "cloud.store" in capsys.readouterr().err
    assert main(["cloud"]) == 2


def test_cloud_serves_until_signalled(tmp_path: Path) -> None:
    """`pymigrate cloud` in a thread-free way: start, accept a batch over CoAP, stop."""
    import os
    import signal

    port = free_port()
    cfg = _config(tmp_path, port)
    result: dict[str, int] = {}

    def stopper() -> None:
        deadline = time.monotonic() + 20
        db = tmp_path / "var" / "cloud.db"
        while not db.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        # deliver one real batch over CoAP before stopping
        from agent.codec import seal_chunk
        from pymigrate.envelope import Batch, encode_batch
        from pymigrate.types import Reading
        from transports.coap import CoapUplink

        async def send() -> None:
            up = CoapUplink(f"coap://127.0.0.1:{port}/ingest", device_id="station-001")
            chunk = seal_chunk([Reading("station-001", "t", 1_767_225_600_000, 1.5, seq=1)])
            ack = await up.send(encode_batch(Batch("station-001", "b1", [chunk])),
                                batch_id="b1", timeout=5)
            result["accepted"] = ack.accepted
            await up.close()

        asyncio.run(send())
        os.kill(os.getpid(), signal.SIGTERM)

    t = threading.Thread(target=stopper)
    t.start()
    rc = main(["cloud", "--config", str(cfg)])
    t.join()
    assert rc == 0
    assert result == {"accepted": 1}


@pytest.mark.parametrize("transport", ["mqtt", "amqp"])
def test_run_over_broker(tmp_path: Path, transport: str,
                         capsys: pytest.CaptureFixture[str]) -> None:
    """The same end-to-end run over the real Mosquitto / RabbitMQ instead of CoAP."""
    import uuid

    from tests.conftest import require_service

    if transport == "mqtt":
        require_service("Mosquitto", "127.0.0.1", 1883)
        table = f'prefix = "pmrun{uuid.uuid4().hex[:8]}"\n'
    else:
        require_service("RabbitMQ", "127.0.0.1", 5672)
        table = ""
    cfg = _config(tmp_path, free_port())
    text = cfg.read_text()
    text = text.replace('transports = ["coap"]', f'transports = ["{transport}"]')
    text = text.replace('listeners = ["coap"]', f'listeners = ["{transport}"]')
    text += f"\n[uplink.{transport}]\n{table}\n[cloud.{transport}]\n{table}"
    cfg.write_text(text)
    assert main(["run", "--config", str(cfg), "--duration", "3"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    fields = dict(kv.split("=") for kv in last.split()[1:])
    assert int(fields["accepted"]) > 20
    assert fields["accepted"] == fields["delivered"] == fields["stored_in_cloud"]
