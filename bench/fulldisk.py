"""``python -m bench fulldisk``: the agent on a real, small, full filesystem.

Real processes (``pymigrate agent``, ``pymigrate cloud``) and a real tmpfs mounted for the
run (root only: it says so and exits 2 otherwise). The sequence:

1. offline, a fast replay source fills the buffer: the state directory is sampled every
   50 ms (``state_dir_peak_bytes`` against ``budget_bytes``) until eviction has happened;
2. another process fills the filesystem to the last byte: the agent must stay up and
   report unhealthy (``/health``);
3. ``kill -9``, then a restart on the full filesystem (``restart_on_full_ok``);
4. the space and the cloud return: time until the backlog is delivered
   (``drain_after_free_s``), then SIGTERM (``sigterm_exit_s``);
5. the cloud's completeness ledger (``SqliteStore.completeness()``): ``unexplained``
   sequence numbers (neither stored nor accounted for by a gap record) and duplicates.

``sqlite_full_errors`` counts SQLITE_FULL/ENOSPC the buffer met (each handled: retried
after eviction, or ingest held back); ``disk_is_full_log_lines`` counts log lines that
say "disk is full" while filling within the budget (phase 1) and overall.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.common import emit

PY = sys.executable
DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / \
    "surfrad_alamosa_2016-01-01_1min.csv"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dir_bytes(path: Path) -> int:
    """Bytes allocated by the files under ``path`` (what fills the filesystem)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, f)).st_blocks * 512
    return total


def config(work: Path, mnt: Path, *, budget: int, port: int, mport: int, loop: bool) -> Path:
    cfg = work / f"agent-{'loop' if loop else 'once'}.toml"
    cfg.write_text(f"""
[device]
id = "fulldisk-dev"
data_dir = "{mnt / 'var'}"

[[sources]]
type = "replay"
path = "{DATA}"
loop = {'true' if loop else 'false'}

[buffer]
budget_bytes = {budget}
commit_window_ms = 50
chunk_max_age_s = 1.0

[validation]
max_past_days = 36500

[uplink]
transports = ["coap"]

[uplink.coap]
host = "127.0.0.1"
port = {port}

[retry]
backoff_base_s = 0.1
backoff_cap_s = 0.5
breaker_open_base_s = 0.5
breaker_open_cap_s = 1.0

[metrics]
enabled = true
host = "127.0.0.1"
port = {mport}

[pipeline]
drain_timeout_s = 10.0

[log]
level = "warning"
format = "json"

[cloud]
store = "sqlite"
listeners = ["coap"]

[cloud.sqlite]
path = "{work / 'cloud.db'}"

[cloud.coap]
host = "127.0.0.1"
port = {port}
""")
    return cfg


class Proc:
    """A ``pymigrate`` subprocess logging to a file."""

    def __init__(self, work: Path, name: str, *args: str) -> None:
        self.log = work / f"{name}.log"
        self._f = open(self.log, "ab")  # noqa: SIM115 - closed in wait()
        self.p = subprocess.Popen([PY, "-m", "pymigrate.cli", *args], stdout=self._f,
                                  stderr=subprocess.STDOUT,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def signal(self, sig: int) -> None:
        if self.p.poll() is None:
            self.p.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait(5)
            return None
        finally:
            self._f.close()


def health(mport: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/health", timeout=2) as r:
            return dict(json.loads(r.read()))
    except Exception:  # not up (yet), or 503 with a body
        return _health_503(mport)


def _health_503(mport: int) -> dict[str, Any] | None:
    import urllib.error

    try:
        urllib.request.urlopen(f"http://127.0.0.1:{mport}/health", timeout=2)
    except urllib.error.HTTPError as e:
        with contextlib.suppress(Exception):
            return dict(json.loads(e.read()))
    except Exception:
        return None
    return None


def wait_for(pred: Any, timeout: float, step: float = 0.1) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(step)
    return None


class Sampler(threading.Thread):
    """Samples the state directory's size every 50 ms."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, dir_bytes(self.path))
            self.stop.wait(0.05)


def fill_fs(path: Path) -> int:
    """Another process fills the filesystem to the last byte; returns bytes written."""
    out = subprocess.run(
        [PY, "-c", "import sys\nn=0\nf=open(sys.argv[1],'wb',buffering=0)\n"
         "try:\n  while True: n+=f.write(b'x'*4096)\nexcept OSError: pass\n"
         "try:\n  while True: n+=f.write(b'x')\nexcept OSError: pass\nprint(n)", str(path)],
        capture_output=True, text=True, timeout=60, check=True)
    return int(out.stdout.strip() or 0)


def count_lines(path: Path, needle: str) -> int:
    try:
        return sum(needle in line for line in path.read_text(errors="replace").splitlines())
    except OSError:
        return 0


def completeness(cloud_db: Path) -> dict[str, int]:
    from cloud.stores.sqlite import SqliteStore

    async def go() -> dict[str, int]:
        store = SqliteStore(cloud_db)
        await store.open()
        try:
            reps = await store.completeness("fulldisk-dev")
        finally:
            await store.close()
        return {"stored": sum(r.stored for r in reps),
                "unexplained": sum(r.unexplained for r in reps),
                "duplicates": sum(r.duplicates for r in reps),
                "gap_readings": sum(sum(r.gaps.values()) for r in reps),
                "max_seq": max((r.max_seq for r in reps), default=0)}

    return asyncio.run(go())


def run(fs_bytes: int, budget: int, fill_timeout_s: float = 120.0,
        work: Path | None = None) -> dict[str, Any]:
    """The whole sequence; returns the figures (raises on setup failures)."""
    own = work is None
    work = Path(tempfile.mkdtemp(prefix="fulldisk-")) if work is None else work
    mnt = work / "mnt"
    mnt.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={fs_bytes}", "tmpfs", str(mnt)],
                   check=True)
    port, mport = free_port(), free_port()
    res: dict[str, Any] = {"fs_bytes": fs_bytes, "budget_bytes": budget}
    procs: list[Proc] = []
    sampler = Sampler(mnt / "var")
    try:
        loop_cfg = config(work, mnt, budget=budget, port=port, mport=mport, loop=True)
        once_cfg = config(work, mnt, budget=budget, port=port, mport=mport, loop=False)
        # 1. offline: fill the budget
        sampler.start()
        agent = Proc(work, "agent-1", "agent", "--config", str(loop_cfg))
        procs.append(agent)
        h = wait_for(lambda: (x := health(mport)) and x["storage"]["evicted_readings"] > 0
                     and x, fill_timeout_s, 0.2)
        if not h:
            raise RuntimeError(f"no eviction within {fill_timeout_s} s: "
                               f"{agent.log.read_text()[-2000:]}")
        time.sleep(2.0)  # keep filling past the first eviction
        h = health(mport) or h
        res["state_dir_peak_bytes"] = sampler.peak
        res["evicted_readings"] = int(h["storage"]["evicted_readings"])
        res["disk_is_full_log_lines_within_budget"] = count_lines(agent.log, "disk is full")
        # 2. another process fills the filesystem
        filler = mnt / "filler"
        res["filler_bytes"] = fill_fs(filler)
        h2 = wait_for(lambda: (x := health(mport)) and not x["healthy"] and x, 15, 0.2)
        res["unhealthy_when_full"] = bool(h2)
        res["health_status_when_full"] = (h2 or health(mport) or {}).get("status")
        time.sleep(2.0)  # keep ingesting on the full filesystem
        h3 = health(mport) or {}
        res["agent_alive_on_full"] = agent.p.poll() is None and all(
            h3.get("stages", {}).values())
        full_errors = int(h3.get("storage", {}).get("disk_full_errors", 0))
        evicted = int(h3.get("storage", {}).get("evicted_readings", res["evicted_readings"]))
        # 3. kill -9, restart on the full filesystem
        agent.signal(signal.SIGKILL)
        agent.wait(10)
        agent = Proc(work, "agent-2", "agent", "--config", str(once_cfg))
        procs.append(agent)
        h4 = wait_for(lambda: (x := health(mport)) and x["stages"] and x, 30, 0.2)
        time.sleep(1.0)
        h4 = health(mport) or h4 or {}
        res["restart_on_full_ok"] = agent.p.poll() is None and bool(h4) and all(
            h4.get("stages", {}).values())
        # 4. space and the cloud return
        cloud = Proc(work, "cloud", "cloud", "--config", str(loop_cfg))
        procs.append(cloud)
        wait_for(lambda: (work / "cloud.db").exists(), 20)
        t0 = time.monotonic()
        filler.unlink()
        done = wait_for(lambda: (x := health(mport)) and x["backlog"]["readings"] == 0
                        and x["backlog"]["chunks"] == 0 and x["counts"]["delivered"] > 0
                        and x, 120, 0.2)
        res["drain_after_free_s"] = round(time.monotonic() - t0, 2) if done else None
        h5 = health(mport) or {}
        full_errors += int(h5.get("storage", {}).get("disk_full_errors", 0))
        evicted += int(h5.get("storage", {}).get("evicted_readings", 0))
        res["healthy_after_free"] = bool(h5.get("healthy"))
        t1 = time.monotonic()
        agent.signal(signal.SIGTERM)
        rc = agent.wait(30)
        res["sigterm_exit_s"] = round(time.monotonic() - t1, 2)
        res["sigterm_rc"] = rc
        res["sqlite_full_errors"] = full_errors
        res["evicted_readings"] = evicted
        logs = [p.log for p in procs if p is not cloud]
        res["task_deaths"] = sum(count_lines(p, "Traceback") + count_lines(p, "task_failed")
                                 for p in logs)
        res["disk_is_full_log_lines"] = sum(count_lines(p, "disk is full") for p in logs)
        cloud.signal(signal.SIGTERM)
        cloud.wait(20)
        res.update(completeness(work / "cloud.db"))
        res["state_dir_peak_bytes"] = sampler.peak
        res["state_dir_peak_over_budget"] = round(sampler.peak / budget - 1, 4)
    finally:
        sampler.stop.set()
        for p in procs:
            p.signal(signal.SIGKILL)
            with contextlib.suppress(Exception):
                p.wait(5)
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        if own:
            subprocess.run(["rm", "-rf", str(work)], check=False)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench fulldisk", description=__doc__)
    ap.add_argument("--fs-bytes", type=int, default=3 * 1024 * 1024)
    ap.add_argument("--budget-bytes", type=int, default=1536 * 1024)
    ap.add_argument("--fill-timeout-s", type=float, default=180.0)
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench fulldisk mounts a tmpfs: run it as root", file=sys.stderr)
        return 2
    res = run(args.fs_bytes, args.budget_bytes, args.fill_timeout_s)
    emit("fulldisk", {"fs_bytes": args.fs_bytes, "budget_bytes": args.budget_bytes,
                      "source": "replay (loop, as fast as accepted) then replay once",
                      "uplink": "coap, cloud down until phase 4"}, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
