"""The first hour of a new user (issue 21), through the real ``pymigrate`` process.

Every mistake a newcomer makes ends within seconds with one plain line that names the
thing to change (key, file, port, variable), exit status 2 and no traceback; the README's
two terminals (``make run`` + ``pymigrate status``) work with the default config.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT / "configs" / "default.toml"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYMIGRATE__")}
    env.update(extra)
    return env


def pm(*args: str, cwd: Path, timeout: float = 10.0,
       env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``pymigrate ARGS`` as its own process; it must end within ``timeout`` s."""
    return subprocess.run([sys.executable, "-m", "pymigrate.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          env=env or _env(), stdin=subprocess.DEVNULL)


def plain_error(res: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Exit 2, no traceback, and the message names what to change."""
    text = res.stdout + res.stderr
    assert res.returncode == 2, text
    assert "Traceback" not in text and "ExceptionGroup" not in text, text
    for n in needles:
        assert n in res.stderr, res.stderr


def config(tmp: Path, *, coap: int | None = None, metrics: int = 0, fast: bool = True,
           replace: dict[str, str] | None = None, name: str = "run.toml") -> Path:
    """configs/default.toml with its state under ``tmp`` and its ports free."""
    text = DEFAULT.read_text()
    text = text.replace('data_dir = "./var"', f'data_dir = "{tmp / "var"}"')
    text = text.replace('path = "./var/cloud.db"', f'path = "{tmp / "var" / "cloud.db"}"')
    text = text.replace("port = 5683", f"port = {coap or free_port(socket.SOCK_DGRAM)}")
    text = text.replace("port = 9108", f"port = {metrics}")
    if fast:
        text = text.replace("interval_s = 1.0", "interval_s = 0.05")
        text = text.replace("chunk_max_age_s = 10.0", "chunk_max_age_s = 0.5")
        text = text.replace("status_interval_s = 5.0", "status_interval_s = 0.5")
    for old, new in (replace or {}).items():
        assert old in text, old
        text = text.replace(old, new)
    p = tmp / name
    p.write_text(text)
    return p


_WEATHER = """type = "weather"          # simulated weather station
sensors = 10              # temperature, humidity, pressure, wind, solar, rain, battery...
interval_s = 0.05
resolution = 0.1
alarm_threshold = 30.0    # temperature above this is sent with critical priority
"""


def replay_config(tmp: Path, csv_path: Path, extra: str = "") -> Path:
    return config(tmp, replace={_WEATHER: f'type = "replay"\npath = "{csv_path}"\n{extra}'})


class Running:
    """A background ``pymigrate`` process, stopped with SIGINT at the end."""

    def __init__(self, *args: str, cwd: Path) -> None:
        self.err = cwd / f"bg-{time.monotonic_ns()}.err"
        self.out = cwd / f"bg-{time.monotonic_ns()}.out"
        self.proc = subprocess.Popen([sys.executable, "-m", "pymigrate.cli", *args], cwd=cwd,
                                     stdout=self.out.open("w"), stderr=self.err.open("w"),
                                     stdin=subprocess.DEVNULL, env=_env())

    def wait_for(self, text: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.err.read_text() + self.out.read_text():
                return
            assert self.proc.poll() is None, self.err.read_text()
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not seen: {self.err.read_text()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(20)
        finally:
            if self.proc.poll() is None:  # pragma: no cover - only on a hang
                self.proc.kill()


# ------------------------------------------------------------------ hangs and tracebacks
def test_run_with_a_missing_replay_file(tmp_path: Path) -> None:
    cfg = replay_config(tmp_path, Path("nope.csv"))
    t0 = time.monotonic()
    res = pm("run", "--config", str(cfg), cwd=tmp_path)
    assert time.monotonic() - t0 < 10
    plain_error(res, "sources[0].path", "replay file not found: nope.csv", str(tmp_path))
    plain_error(pm("agent", "--check-config", str(cfg), cwd=tmp_path), "sources[0].path")
    plain_error(pm("agent", "--config", str(cfg), cwd=tmp_path), "sources[0].path")


def test_run_with_an_unusable_data_dir(tmp_path: Path) -> None:
    f = tmp_path / "plainfile"
    f.write_text("x")
    for data_dir in (f, f / "sub"):
        cfg = config(tmp_path, replace={f'data_dir = "{tmp_path / "var"}"':
                                        f'data_dir = "{data_dir}"'})
        res = pm("run", "--config", str(cfg), cwd=tmp_path)
        plain_error(res, "device.data_dir", str(data_dir), "not a directory")
        plain_error(pm("agent", "--check-config", str(cfg), cwd=tmp_path), "device.data_dir")
    if os.geteuid() != 0:  # root writes through permission bits
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        cfg = config(tmp_path, replace={f'data_dir = "{tmp_path / "var"}"': f'data_dir = "{ro}"'})
        plain_error(pm("run", "--config", str(cfg), cwd=tmp_path), "device.data_dir",
                    "not writable")


def test_a_non_utf8_config(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    cfg.write_bytes(cfg.read_bytes() + b"# outside: 21 \xb0C\n")
    line = cfg.read_bytes().count(b"\n")
    for args in (["run", "--config"], ["agent", "--config"], ["agent", "--check-config"],
                 ["cloud", "--check-config", "--config"]):
        plain_error(pm(*args, str(cfg), cwd=tmp_path), str(cfg), f"line {line} is not UTF-8")


@pytest.mark.parametrize(("content", "problem"), [
    (b"", "is empty"),
    (b"ts;temperature\n2026-01-01T00:00:00Z;21.5\n", "separated by ';'"),
    (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03binary", "binary"),
    (b"1767225600,20.5\n1767225601,20.6\n", "is data, not a header"),
])
def test_run_with_an_unusable_csv(tmp_path: Path, content: bytes, problem: str) -> None:
    csv_path = tmp_path / "data.csv"
    csv_path.write_bytes(content)
    t0 = time.monotonic()
    res = pm("run", "--config", str(replay_config(tmp_path, csv_path)), cwd=tmp_path)
    assert time.monotonic() - t0 < 10
    plain_error(res, "sources[0].path", str(csv_path), problem)


def test_a_second_run_on_the_same_ports_refuses_to_start(tmp_path: Path) -> None:
    coap, metrics = free_port(socket.SOCK_DGRAM), free_port()
    (tmp_path / "a").mkdir()
    first = Running("run", "--config", str(config(tmp_path / "a", coap=coap, metrics=metrics)),
                    cwd=tmp_path)
    try:
        first.wait_for("agent started")
        (tmp_path / "b").mkdir()
        res = pm("run", "--config", str(config(tmp_path / "b", coap=coap)), cwd=tmp_path)
        plain_error(res, "cloud.coap.port", f"127.0.0.1:{coap}", "in use")
        # the CoAP port free, the agent's metrics port taken: named too
        res = pm("run", "--config", str(config(tmp_path / "b", metrics=metrics)), cwd=tmp_path)
        plain_error(res, "metrics.port", f"127.0.0.1:{metrics}")
        # the first one is untouched: the README's second terminal
        status = pm("status", "--url", f"http://127.0.0.1:{metrics}", cwd=tmp_path)
        assert status.returncode == 0, status.stdout + status.stderr
        assert "status OK" in status.stdout and "station-001" in status.stdout
    finally:
        assert first.stop() == 0, first.err.read_text()


# ------------------------------------------------------------------ accepted but wrong
def test_status_interval_zero_is_refused(tmp_path: Path) -> None:
    cfg = config(tmp_path, replace={"status_interval_s = 0.5": "status_interval_s = 0"})
    t0 = time.monotonic()
    plain_error(pm("run", "--config", str(cfg), cwd=tmp_path), "pipeline.status_interval_s")
    assert time.monotonic() - t0 < 10
    plain_error(pm("agent", "--check-config", str(cfg), cwd=tmp_path),
                "pipeline.status_interval_s")


def test_replay_with_exit_when_done_ends_by_itself(tmp_path: Path) -> None:
    csv_path = tmp_path / "data.csv"
    csv_path.write_text("ts,temp,hum\n" + "".join(
        f"{1767225600 + i},{20 + i / 10},{40 + i % 7}\n" for i in range(60)))
    cfg = replay_config(tmp_path, csv_path, "exit_when_done = true\n")
    res = pm("run", "--config", str(cfg), cwd=tmp_path, timeout=30)
    assert res.returncode == 0, res.stderr
    last = res.stdout.strip().splitlines()[-1]
    fields = dict(kv.split("=") for kv in last.split()[1:])
    assert fields["accepted"] == fields["delivered"] == fields["stored_in_cloud"] == "120"


# ------------------------------------------------------------------ messages to act on
def test_a_bad_environment_variable_is_named(tmp_path: Path) -> None:
    res = pm("agent", "--check-config", str(DEFAULT), cwd=tmp_path,
             env=_env(PYMIGRATE__BUFFER__BUDGET_BYTES="abc"))
    plain_error(res, "buffer.budget_bytes", "PYMIGRATE__BUFFER__BUDGET_BYTES='abc'")


def test_json_log_format_makes_progress_json_too(tmp_path: Path) -> None:
    res = pm("run", "--config", str(config(tmp_path)), "--duration", "1.6",
             "--log-format", "json", cwd=tmp_path, timeout=30)
    assert res.returncode == 0, res.stderr
    events = [json.loads(line) for line in (res.stdout + res.stderr).splitlines()]
    progress = [e for e in events if e["event"] == "progress"]
    stopped = [e for e in events if e["event"] == "summary"]
    assert progress and stopped
    assert stopped[-1]["accepted"] == stopped[-1]["delivered"] == stopped[-1]["stored_in_cloud"]


def test_agent_without_metrics_logs_its_progress(tmp_path: Path) -> None:
    cfg = config(tmp_path, replace={"enabled = true": "enabled = false",  # no cloud here:
                                    "drain_timeout_s = 10.0": "drain_timeout_s = 0.2"})
    agent = Running("agent", "--config", str(cfg), cwd=tmp_path)
    try:
        agent.wait_for("progress")
    finally:
        assert agent.stop() == 0
    assert "accepted=" in agent.err.read_text()
    # what that agent buffered is delivered by the next run, and said to be earlier data
    # (same data_dir; a drain deadline long enough for a loaded machine)
    run_cfg = config(tmp_path, replace={"enabled = true": "enabled = false"}, name="run2.toml")
    res = pm("run", "--config", str(run_cfg), "--duration", "2", cwd=tmp_path, timeout=60)
    assert res.returncode == 0, res.stderr
    last = res.stdout.strip().splitlines()[-1]
    f = {k: int(v) for k, v in (kv.split("=") for kv in last.split()[1:])}
    assert f["earlier_backlog"] > 0
    assert f["delivered"] == f["accepted"] + f["earlier_backlog"] == f["stored_in_cloud"]


# ------------------------------------------------------------------ friction
def test_cloud_query_and_fleet_status_do_not_create_stores(tmp_path: Path) -> None:
    res = pm("cloud", "query", "--config", str(DEFAULT), "station-001", cwd=tmp_path)
    plain_error(res, "cloud.sqlite.path", "no store at ./var/cloud.db")
    res = pm("fleet", "status", cwd=tmp_path)
    assert res.returncode == 2 and "no fleet store at fleet.db" in res.stderr, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_default_config_serves_metrics_on_loopback_only() -> None:
    import tomllib

    m = tomllib.loads(DEFAULT.read_text())["metrics"]
    assert m == {"enabled": True, "host": "127.0.0.1", "port": 9108}


def test_cloud_refuses_busy_ports_and_an_unusable_store_path(tmp_path: Path) -> None:
    coap = free_port(socket.SOCK_DGRAM)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.socket() as tcp:
        udp.bind(("127.0.0.1", coap))  # something else holds the CoAP port
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        busy_tcp = tcp.getsockname()[1]
        res = pm("cloud", "--config", str(config(tmp_path, coap=coap)), cwd=tmp_path)
        plain_error(res, "cloud.coap.port", f"127.0.0.1:{coap}")
        res = pm("cloud", "--config", str(config(tmp_path)), "--metrics-port", str(busy_tcp),
                 cwd=tmp_path)
        plain_error(res, "--metrics-port", f"127.0.0.1:{busy_tcp}", "Address already in use")
    f = tmp_path / "plainfile"
    f.write_text("")
    cfg = config(tmp_path, replace={f'path = "{tmp_path / "var" / "cloud.db"}"':
                                    f'path = "{f / "cloud.db"}"'})
    for args in (["cloud", "--check-config", "--config"], ["cloud", "--config"],
                 ["run", "--config"]):
        plain_error(pm(*args, str(cfg), cwd=tmp_path), "cloud.sqlite.path", str(f))
