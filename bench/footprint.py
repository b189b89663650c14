"""Agent footprint: resident memory and start-up time of the real ``pymigrate agent`` process.

``python -m bench footprint`` measures, each in a fresh subprocess:

* ``import_s``: ``python -c 'import agent.supervisor'`` wall time (median of N), and the
  bare interpreter start for reference;
* ``start_to_ready_s``: from spawning ``pymigrate agent`` to its systemd ``READY=1``
  datagram (a real ``NOTIFY_SOCKET`` in a temp dir), for an empty buffer;
* ``rss_after_start_bytes``: VmRSS a few seconds after READY (weather station, 10 sensors
  at 1 Hz, CoAP uplink to a closed port: the agent buffers and retries);
* ``rss_day_buffered_bytes``: the same, started on a buffer pre-filled through the buffer
  API with a day of 10 sensors at 1 Hz (864,000 readings) that it cannot upload.

Targets from the issue: RSS < 40 MB, start < 1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import emit

DAY_S = 86_400
MB = 1_000_000


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(data_dir: Path, coap_port: int, sensors: int, metrics: bool) -> str:
    return f"""
[device]
id = "footprint-1"
data_dir = "{data_dir}"

[[sources]]
type = "weather"
sensors = {sensors}
interval_s = 1.0

[uplink]
transports = ["coap"]

[uplink.coap]
host = "127.0.0.1"
port = {coap_port}

[metrics]
enabled = {'true' if metrics else 'false'}
port = 0

[pipeline]
drain_timeout_s = 1.0

[log]
format = "json"
level = "warning"
"""


def _time_cmd(code: str, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


async def prefill(data_dir: Path, sensors: int, seconds: int) -> dict[str, Any]:
    """Write ``seconds`` of ``sensors`` at 1 Hz, ending now, through the buffer API."""
    from agent.buffer import BufferConfig, DurableBuffer
    from bench.buffer import Weather
    from pymigrate.clock import VirtualClock
    from pymigrate.types import Reading

    start_ms = int(time.time() * 1000) - seconds * 1000
    clock = VirtualClock(start_ms=start_ms)
    buf = DurableBuffer(BufferConfig(path=str(data_dir / "buffer.db"), commit_window_ms=0),
                        clock=clock)
    await buf.open()
    weather = Weather(sensors, seed=5)
    step = 60
    t0 = time.perf_counter()
    for t_s in range(0, seconds, step):
        batch = [Reading("footprint-1", name, start_ms + s * 1000, v)
                 for s in range(t_s, min(t_s + step, seconds))
                 for name, v in zip(weather.names, weather.values(s))]
        await buf.append(batch)
        await clock.advance(step)
    await buf.flush()
    st = buf.stats()
    await buf.close()
    return {"prefill_readings": sum(st.readings_pending.values()),
            "prefill_chunks": st.chunks_pending,
            "prefill_buffer_bytes": st.bytes_on_disk,
            "prefill_seconds": round(time.perf_counter() - t0, 2)}


def _rss(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in bytes from /proc."""
    vals = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            vals[key] = int(rest.split()[0]) * 1024
    return vals["VmRSS"], vals["VmHWM"]


def run_agent(data_dir: Path, *, sensors: int, settle_s: float, metrics: bool,
              extra_env: dict[str, str] | None = None, timeout_s: float = 30.0
              ) -> dict[str, Any]:
    """Spawn ``pymigrate agent``; time READY; sample RSS after ``settle_s``; stop it."""
    cfg = data_dir / "agent.toml"
    cfg.write_text(_config(data_dir, _free_udp_port(), sensors, metrics))
    sock_path = data_dir / "notify.sock"
    sock_path.unlink(missing_ok=True)
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(str(sock_path))
    rx.settimeout(timeout_s)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYMIGRATE__", "WATCHDOG"))}
    env["NOTIFY_SOCKET"] = str(sock_path)
    env.pop("AIOCOAP_CLIENT_TRANSPORT", None)
    env.update(extra_env or {})
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pymigrate.cli", "agent", "--config",
                             str(cfg)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        msg = rx.recv(4096).decode()
        ready_s = time.perf_counter() - t0
        if not msg.startswith("READY=1"):
            raise RuntimeError(f"unexpected first notify message {msg!r}")
        rss_ready, _ = _rss(proc.pid)
        time.sleep(settle_s)
        rss, hwm = _rss(proc.pid)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=timeout_s)
        if proc.returncode != 0:
            raise RuntimeError(f"agent exited {proc.returncode}: {err[-2000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        rx.close()
    return {"start_to_ready_s": round(ready_s, 3), "rss_at_ready_bytes": rss_ready,
            "rss_bytes": rss, "rss_peak_bytes": hwm}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench footprint",
                                 description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--sensors", type=int, default=10)
    ap.add_argument("--seconds", type=int, default=DAY_S, help="buffered data to pre-fill")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds after READY to sample")
    ap.add_argument("--repeat", type=int, default=3, help="import/start timing repetitions")
    ap.add_argument("--metrics", action="store_true", help="run with [metrics] enabled")
    args = ap.parse_args(argv)

    base_s = _time_cmd("pass", args.repeat)
    import_s = _time_cmd("import agent.supervisor", args.repeat)
    results: dict[str, Any] = {"python_start_s": round(base_s, 3),
                               "import_agent_supervisor_s": round(import_s, 3)}
    starts = []
    empty: dict[str, Any] = {}
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="pymigrate-fp-") as d:
            empty = run_agent(Path(d), sensors=args.sensors, settle_s=args.settle,
                              metrics=args.metrics)
            starts.append(empty["start_to_ready_s"])
    results["start_to_ready_s_median"] = round(statistics.median(starts), 3)
    results["start_to_ready_s_all"] = starts
    results["rss_after_start_bytes"] = empty["rss_bytes"]
    results["rss_after_start_peak_bytes"] = empty["rss_peak_bytes"]
    with tempfile.TemporaryDirectory(prefix="pymigrate-fp-") as d:
        results.update(asyncio.run(prefill(Path(d), args.sensors, args.seconds)))
        day = run_agent(Path(d), sensors=args.sensors, settle_s=args.settle,
                        metrics=args.metrics)
        # what the shipped systemd unit / image set: aiocoap's plain UDP client transport
        # only (its default client context also loads OSCORE, TCP, TLS and WebSockets)
        slim = run_agent(Path(d), sensors=args.sensors, settle_s=args.settle,
                         metrics=args.metrics, extra_env={"AIOCOAP_CLIENT_TRANSPORT": "udp6"})
    results["start_to_ready_day_buffered_s"] = day["start_to_ready_s"]
    results["rss_day_buffered_bytes"] = day["rss_bytes"]
    results["rss_day_buffered_peak_bytes"] = day["rss_peak_bytes"]
    results["rss_day_buffered_udp6_only_bytes"] = slim["rss_bytes"]
    results["rss_target_met"] = max(empty["rss_bytes"], day["rss_bytes"]) < 40 * MB
    results["start_target_met"] = results["start_to_ready_s_median"] < 1.0
    emit("footprint", vars(args), results)
    return 0
