"""Operations against a running agent on loopback: the systemd notify protocol over a real
datagram socket, /metrics and /health over HTTP, ``pymigrate status``, SIGHUP reload."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import parse_agent_config
from agent.metrics import MetricsServer
from agent.reload import reload_agent
from agent.status import main as status_main
from agent.status import parse_metrics
from agent.supervisor import Agent
from pymigrate.clock import WallClock
from pymigrate.errors import ConfigError
from tests.conftest import free_port
from tests.unit.fakes_uplink import FakeUplink

pytestmark = pytest.mark.integration


def _cfg(tmp: Path, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "device": {"id": "ops-dev", "data_dir": str(tmp)},
        "sources": [{"type": "weather", "sensors": 5, "interval_s": 0.01}],
        "buffer": {"chunk_max_age_s": 0.1, "commit_window_ms": 10},
        "pipeline": {"drain_timeout_s": 2.0},
    }
    data.update(extra)
    return data


@contextlib.asynccontextmanager
async def run_agent(data: dict[str, Any], source_file: str = "") -> AsyncIterator[Agent]:
    clock = WallClock()
    agent = Agent(parse_agent_config(data, source_file=source_file), clock=clock,
                  uplinks=[FakeUplink(clock, delay_s=0.002)])
    task = asyncio.create_task(agent.run(), name="test[agent]")
    started = asyncio.create_task(agent.started.wait())
    await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        started.cancel()
        await task  # raises the start-up error
    try:
        yield agent
    finally:
        agent.request_stop()
        await asyncio.wait_for(task, 15)


async def _get(url: str) -> tuple[int, bytes, str]:
    def fetch() -> tuple[int, bytes, str]:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status, r.read(), r.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), exc.headers.get("Content-Type", "")

    return await asyncio.to_thread(fetch)


def _metrics_cfg(tmp: Path, port: int = 0) -> dict[str, Any]:
    return _cfg(tmp, metrics={"enabled": True, "host": "127.0.0.1", "port": port})


# ------------------------------------------------------------------ systemd notify
async def test_notify_protocol_ready_watchdog_stopping(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    sock_path = tmp_path / "notify.sock"
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(str(sock_path))
    rx.setblocking(False)
    got: list[bytes] = []
    loop = asyncio.get_running_loop()
    loop.add_reader(rx.fileno(), lambda: got.append(rx.recv(4096)))
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock_path))
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # 0.1 s: a WATCHDOG=1 every 50 ms
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    try:
        async with run_agent(_cfg(tmp_path)) as agent:
            await asyncio.sleep(0.7)
            assert agent.ingest.counts["accepted"] > 0
            n_running = len(got)
        await asyncio.sleep(0.05)
    finally:
        loop.remove_reader(rx.fileno())
        rx.close()
    msgs = [m.decode() for m in got]
    assert msgs[0].splitlines()[0] == "READY=1"
    assert f"MAINPID={os.getpid()}" in msgs[0]
    watchdogs = [m for m in msgs if m.startswith("WATCHDOG=1")]
    assert len(watchdogs) >= 4, msgs  # ~10 expected in 0.5 s; allow a slow CI box
    assert n_running >= 5
    assert msgs[-1].startswith("STOPPING=1")
    assert "EXTEND_TIMEOUT_USEC=7000000" in msgs[-1]  # drain_timeout_s 2.0 + 5 s
    assert not any(m.startswith("WATCHDOG=1") for m in msgs[msgs.index(msgs[-1]):])


async def test_notify_abstract_namespace_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.sdnotify import Notifier

    name = f"pymigrate-test-{os.getpid()}-{time.monotonic_ns()}"
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind("\0" + name)
    rx.settimeout(2)
    try:
        n = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert n.ready("up")
        assert rx.recv(4096).decode().startswith("READY=1\nSTATUS=up")
    finally:
        rx.close()


# ------------------------------------------------------------------ metrics + health
async def test_metrics_scrape_counters_move(tmp_path: Path) -> None:
    async with run_agent(_metrics_cfg(tmp_path)) as agent:
        assert agent.metrics is not None
        base = f"http://127.0.0.1:{agent.metrics.port}"
        await asyncio.sleep(0.4)
        status, body1, ctype = await _get(base + "/metrics")
        assert status == 200 and ctype.startswith("text/plain")
        await asyncio.sleep(0.6)
        _, body2, _ = await _get(base + "/metrics")
    m1, m2 = parse_metrics(body1.decode()), parse_metrics(body2.decode())
    p = "pymigrate_agent_"
    for name in ("readings_received_total", "readings_accepted_total", "batches_sent_total",
                 "batches_acked_total", "readings_acked_total", "bytes_sent_total"):
        assert m2[p + name] > m1[p + name] > 0, name
    assert m2[p + "breaker_state"] == {"fake": 0.0}
    assert m2[p + "stage_up"]["ingest"] == 1.0
    assert m2[p + "buffer_bytes"] > 0
    assert p + "clock_offset_seconds" in m2
    assert p + "aggregation_ratio" in m2
    assert m2[p + "process_resident_memory_bytes"] > 0
    # the collector reads the stages' own counters: no second bookkeeping to drift
    assert m2[p + "readings_accepted_total"] <= agent.ingest.counts["accepted"]


async def test_health_endpoint_and_routes(tmp_path: Path) -> None:
    async with run_agent(_metrics_cfg(tmp_path)) as agent:
        base = f"http://127.0.0.1:{agent.metrics.port}"
        await asyncio.sleep(0.3)
        status, body, ctype = await _get(base + "/health")
        assert status == 200 and ctype == "application/json"
        doc = json.loads(body)
        assert doc["healthy"] is True and doc["status"] == "ok"
        assert doc["device"] == "ops-dev"
        assert set(doc["stages"]) >= {"ingest", "uploader", "supervisor", "source:weather:0"}
        assert doc["breakers"] == {"fake": "closed"}
        assert doc["clock"]["state"] in ("synced", "unsynced", "anchored")
        assert doc["oldest_data_age_s"] >= 0
        assert doc["counts"]["accepted"] > 0
        assert (await _get(base + "/nope"))[0] == 404
        assert (await _get(base + "/"))[0] == 200

        def post() -> int:
            req = urllib.request.Request(base + "/metrics", data=b"x", method="POST")
            try:
                urllib.request.urlopen(req, timeout=5)
            except urllib.error.HTTPError as exc:
                return exc.code
            return 200

        assert await asyncio.to_thread(post) == 405
        # a garbage request does not take the endpoint down
        r, w = await asyncio.open_connection("127.0.0.1", agent.metrics.port)
        w.write(b"\x00\xff garbage\r\n\r\n")
        await w.drain()
        await r.read()
        w.close()
        assert (await _get(base + "/health"))[0] == 200


async def test_metrics_port_in_use_fails_start(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(BaseException) as ei:
            async with run_agent(_metrics_cfg(tmp_path, port)):
                pass
        assert ei.group_contains(ConfigError, match=f"metrics.port: cannot listen on "
                                 f"127.0.0.1:{port}: Address already in use")


# ------------------------------------------------------------------ pymigrate status
async def test_status_command_healthy_unreachable_and_unhealthy(tmp_path: Path) -> None:
    async with run_agent(_metrics_cfg(tmp_path)) as agent:
        url = f"http://127.0.0.1:{agent.metrics.port}"
        await asyncio.sleep(0.4)
        out = io.StringIO()
        rc = await asyncio.to_thread(status_main, ["--url", url], out=out)
        text = out.getvalue()
        assert rc == 0, text
        assert "ops-dev" in text and "status OK" in text
        assert "ingest up" in text and "fake: closed" in text
        accepted = int(text.split("accepted ", 1)[1].split()[0])
        assert accepted > 0
        js = io.StringIO()
        assert await asyncio.to_thread(status_main, ["--url", url, "--json"], out=js) == 0
        assert json.loads(js.getvalue())["healthy"] is True
    # the agent is gone: unreachable
    assert await asyncio.to_thread(status_main, ["--url", url, "--quiet", "--timeout", "1"]) == 2
    # a stopped agent's stages are not alive: served health is 503 and status exits 1
    server = MetricsServer(agent, msgspec_replace_port(agent))
    await server.start()
    try:
        url2 = f"http://127.0.0.1:{server.port}"
        code, body, _ = await _get(url2 + "/health")
        assert code == 503 and json.loads(body)["healthy"] is False
        out = io.StringIO()
        assert await asyncio.to_thread(status_main, ["--url", url2], out=out) == 1
        assert "DOWN" in out.getvalue()
    finally:
        await server.close()


def msgspec_replace_port(agent: Agent) -> Any:
    import msgspec

    return msgspec.structs.replace(agent.config.metrics, port=0)


# ------------------------------------------------------------------ SIGHUP reload
async def test_reload_applies_live_keys_and_refuses_bad_config(tmp_path: Path) -> None:
    cfg_file = tmp_path / "agent.toml"
    base = f"""
[device]
id = "ops-dev"
data_dir = "{tmp_path}"

[[sources]]
type = "weather"
sensors = 3
interval_s = 0.02

[buffer]
chunk_max_age_s = 0.1

[metrics]
enabled = true
port = 0

[pipeline]
drain_timeout_s = 2.0
"""
    cfg_file.write_text(base)
    from agent.envconfig import load_config

    relogged: list[tuple[str, str]] = []
    async with run_agent(_as_dict(load_config(cfg_file, env={})),
                         source_file=str(cfg_file)) as agent:
        old_port = agent.metrics.port
        new_port = free_port()
        cfg_file.write_text(base.replace("port = 0", f"port = {new_port}") + """
[log]
level = "debug"

[retry]
profile = "metered"
linger_metered_s = 5.0
backoff_base_s = 1.0

[validation]
max_future_s = 60.0
""".replace("[buffer]\nchunk_max_age_s = 0.1", ""))
        res = await reload_agent(agent, env={}, relog=lambda f, lv: relogged.append((f, lv)))
        assert res.ok, res.error
        assert "log.level" in res.applied and "retry.profile" in res.applied
        assert "metrics.port" in res.applied
        assert "retry.backoff_base_s" in res.restart_required
        assert relogged == [("console", "debug")]
        assert agent.uploader.power.profile == "metered"
        assert agent.uploader.cfg.linger_metered_s == 5.0
        assert agent.uploader.cfg.backoff_base_s == 0.5  # baked in at start: not applied
        assert agent.validator.config.max_future_s == 60.0
        assert agent.config.log.level == "debug"
        assert agent.metrics.port == new_port
        assert (await _get(f"http://127.0.0.1:{new_port}/health"))[0] == 200
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", old_port)

        # a bad config is refused and the running one kept
        good = agent.config
        cfg_file.write_text(base + '\n[retry]\nprofile = "solar"\n')
        res = await reload_agent(agent, env={})
        assert not res.ok and "retry.profile" in res.error
        assert agent.config is good
        cfg_file.write_text("this is [not toml")
        assert not (await reload_agent(agent, env={})).ok
        assert agent.config is good
        assert agent.metrics.port == new_port


def _as_dict(cfg: Any) -> dict[str, Any]:
    import msgspec

    d: dict[str, Any] = msgspec.to_builtins(cfg)
    d.pop("source_file", None)
    return d


# ------------------------------------------------------------------ the CLI process
def _agent_toml(tmp: Path, metrics_port: int, coap_port: int, level: str = "info") -> str:
    return f"""
[device]
id = "ops-cli"
data_dir = "{tmp / 'var'}"

[[sources]]
type = "weather"
sensors = 3
interval_s = 0.05

[uplink]
transports = ["coap"]

[uplink.coap]
host = "127.0.0.1"
port = {coap_port}

[metrics]
enabled = true
port = {metrics_port}

[pipeline]
drain_timeout_s = 0.5

[log]
format = "json"
level = "{level}"
"""


def test_cli_agent_under_notify_sighup_and_sigterm(tmp_path: Path) -> None:
    """``pymigrate agent`` as systemd runs it: READY, /health, SIGHUP good and bad, STOPPING."""
    mport, cport = free_port(), free_port(socket.SOCK_DGRAM)  # nothing listens on cport
    cfg = tmp_path / "agent.toml"
    cfg.write_text(_agent_toml(tmp_path, mport, cport))
    cfg.chmod(0o600)
    sock_path = tmp_path / "notify.sock"
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(str(sock_path))
    rx.settimeout(20)
    env = {**os.environ, "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "2000000",
           "PYMIGRATE__DEVICE__ID": "ops-cli-env"}
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen([sys.executable, "-m", "pymigrate.cli", "agent", "--config",
                             str(cfg)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        first = rx.recv(4096).decode()
        assert first.startswith("READY=1"), first
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/health", timeout=5) as r:
            doc = json.loads(r.read())
        assert doc["device"] == "ops-cli-env"  # PYMIGRATE__DEVICE__ID override
        assert doc["runtime"]["framework"] == "systemd"
        cfg.write_text(_agent_toml(tmp_path, mport, cport, level="debug"))
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)  # let the reload read the file before it is rewritten
        cfg.write_text(_agent_toml(tmp_path, mport, cport, level="loud"))
        time.sleep(1.0)
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/health", timeout=5) as r:
            assert json.loads(r.read())["healthy"] is True  # still running the good config
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        msgs = []
        rx.settimeout(0.2)
        with contextlib.suppress(TimeoutError, BlockingIOError):
            while True:
                msgs.append(rx.recv(4096).decode())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        rx.close()
    assert proc.returncode == 0, out
    events = [json.loads(line).get("event") for line in out.splitlines()
              if line.startswith("{")]
    assert "config reloaded" in events, out
    assert "config reload refused: keeping the running config" in events, out
    assert any(m.startswith("STOPPING=1") for m in msgs), msgs
