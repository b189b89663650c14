"""No accepted reading is lost across repeated ``kill -9`` of a process writing the buffer."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pymigrate.clock import WallClock

ROOT = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("_buffer_child.py")
KILLS = 6


def _run_and_kill(db: Path, seed: int, rnd: random.Random, log: Path) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "ab") as err:
        proc = subprocess.Popen([sys.executable, str(CHILD), str(db), str(seed)], cwd=ROOT,
                                env=env, stdout=subprocess.PIPE, stderr=err)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()  # wait until the buffer is open
            assert line == b"ready\n", (line, log.read_text())
            time.sleep(rnd.uniform(0.2, 0.9))
        finally:
            proc.send_signal(signal.SIGKILL)
            out, _ = proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    return out.decode().split("\n")[:-1]  # a line cut by the kill is not counted


@pytest.mark.integration
async def test_no_accepted_reading_lost_across_kill9(tmp_path: Path) -> None:
    from agent.buffer import BufferConfig, DurableBuffer
    from agent.codec import open_chunk

    db = tmp_path / "buf.db"
    rnd = random.Random(7)
    accepted: dict[str, list[int]] = {}
    for run in range(KILLS):
        for line in _run_and_kill(db, run, rnd, tmp_path / "child.log"):
            dev, _prio, *fields = line.split()
            accepted.setdefault(dev, []).extend(int(f) for f in fields)
    for dev, seqs in accepted.items():
        assert len(seqs) == len(set(seqs)), f"{dev}: a sequence number was handed out twice"
    assert sum(len(v) for v in accepted.values()) > 500  # the test did exercise the buffer

    buf = DurableBuffer(BufferConfig(path=str(db), commit_window_ms=0), clock=WallClock())
    await buf.open()
    try:
        await buf.flush()
        stored: dict[str, list[int]] = {}
        while got := await buf.take(1 << 30, max_chunks=512):
            for sc in got:
                for r in open_chunk(sc.chunk):
                    stored.setdefault(r.device_id, []).append(r.seq)
            await buf.ack([sc.id for sc in got])
        assert buf.stats().quarantined == 0 and buf.stats().moved_aside == 0
    finally:
        await buf.close()
    for dev, seqs in stored.items():
        assert len(seqs) == len(set(seqs)), f"{dev}: a sequence number is stored twice"
    for dev, seqs in accepted.items():
        missing = set(seqs) - set(stored.get(dev, []))
        assert not missing, f"{dev}: {len(missing)} accepted lost, e.g. {sorted(missing)[:5]}"
