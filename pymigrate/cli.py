"""``pymigrate``: the command line. It only parses, builds and runs.

  pymigrate agent --config FILE [--check-config]   the edge daemon
  pymigrate cloud --config FILE                    the cloud ingest
  pymigrate cloud query ...                        print a device's series
  pymigrate cloud completeness [DEVICE] ...        every sequence number stored or accounted for
  pymigrate run --config FILE                      agent + cloud ingest in one process
  pymigrate fleet ...                              fleet coordinator (rollouts in waves)
  pymigrate simulate NAME ...                      field scenarios on virtual time
  pymigrate status [--url URL]                     read a running agent's health
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from pymigrate import __version__
from pymigrate.errors import ConfigError, PyMigrateError

DELEGATES = {
    "fleet": ("cloud.fleet.cli", "fleet coordinator: rollouts in waves, gates, rollback"),
    "simulate": ("simulators.cli", "run a field scenario on virtual time and report"),
    "status": ("agent.status", "print a running agent's health and counters"),
}


_AGENT_HELP = """\
signals:
  SIGTERM, SIGINT   graceful stop: sources stop, the queue drains into the buffer, open
                    chunks are sealed, the uploader drains for [pipeline] drain_timeout_s;
                    a second signal cancels at once
  SIGHUP            reload FILE: a bad config is refused (logged) and the running one kept;
                    log, validation, run-time retry keys (profile, battery, linger ...),
                    pipeline deadlines and the metrics address apply live, the rest is
                    reported as needing a restart (systemctl reload pymigrate-agent)

systemd:
  Type=notify: READY=1 once every stage runs, WATCHDOG=1 every WatchdogSec/2 while every
  stage is alive, STOPPING=1 when a stop begins (configs/systemd/pymigrate-agent.service)

metrics:
  [metrics] enabled = true serves Prometheus text on http://HOST:PORT/metrics and a JSON
  health document on /health (default 127.0.0.1:9108); 'pymigrate status' reads them

files:
  FILE              the TOML config (configs/agent-{mqtt,coap,amqp}.toml are annotated)
  DATA_DIR          [device] data_dir: buffer.db, sequence counter, aggregation windows

exit status:
  0 stopped cleanly, 1 a stage failed or the stop was forced, 2 invalid config or usage
"""

_CLOUD_HELP = """\
signals:
  SIGTERM, SIGINT   stop: listeners close, the store is closed (unacked batches are resent
                    by the devices: nothing acked is lost)

metrics:
  --metrics-port PORT serves Prometheus text on /metrics (pymigrate_cloud_*) and a JSON
  /health that is 200 once the store is open and every listener runs

files:
  FILE              TOML with a [cloud] table (store, listeners, [cloud.<store>],
                    [cloud.<listener>]) and an optional [log] table;
                    configs/docker/cloud.toml is an MQTT + SQLite example

exit status:
  0 stopped, 1 runtime error, 2 invalid config or usage
"""

_RUN_HELP = """\
files:
  FILE              agent sections ([device], [[sources]], [buffer], [uplink] ...) plus a
                    [cloud] table for the embedded ingest (configs/default.toml)

signals and exit status: as for 'pymigrate agent' (SIGTERM/SIGINT stop gracefully;
0 clean stop, 1 stage failure or forced stop, 2 invalid config)
"""

_ENV_HELP = """
environment:
  PYMIGRATE__SECTION__KEY=VALUE   override any config key (VALUE read as TOML when it
                                  parses: PYMIGRATE__METRICS__PORT=9200)
  AWS_IOT_THING_NAME              Greengrass thing name -> device.id
  IOTEDGE_DEVICEID                Azure IoT Edge device id -> device.id
  PYMIGRATE_DEVICE_ID_FROM=hostname   device.id from the host name (one container each)
  NOTIFY_SOCKET, WATCHDOG_USEC    set by systemd for Type=notify services
"""


def _parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="pymigrate", formatter_class=raw,
        description="PyMigrate IoT: durable edge-to-cloud time-series migration.",
        epilog="Run 'pymigrate COMMAND --help' for a command's manual.\n" + _ENV_HELP)
    p.add_argument("--version", action="version", version=f"pymigrate {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    a = sub.add_parser("agent", help="run the edge agent daemon", formatter_class=raw,
                       description="Run the edge agent: sources -> dedup -> time correction -> "
                       "aggregation -> durable buffer -> uploader. SIGTERM/SIGINT stop "
                       "gracefully (a second one forces), SIGHUP reloads the config.",
                       epilog=_AGENT_HELP + _ENV_HELP)
    a.add_argument("--config", help="agent TOML config file")
    a.add_argument("--check-config", nargs="?", const="", default=None, metavar="FILE",
                   help="validate the config (FILE or --config) and the files and "
                   "directories it names, and exit: 0 valid, 2 invalid")
    a.add_argument("--log-format", choices=("console", "json"),
                   help="override [log] format (json: one JSON object a line, progress too)")

    c = sub.add_parser("cloud", help="run the cloud ingest (or 'cloud query', "
                       "'cloud completeness')",
                       formatter_class=raw,
                       description="Run the cloud ingest from the [cloud] table of FILE. "
                       "'pymigrate cloud query --help' prints a device's stored series; "
                       "'pymigrate cloud completeness --help' accounts for every sequence "
                       "number (stored, in a gap with its reason, or unexplained).",
                       epilog=_CLOUD_HELP)
    c.add_argument("--config", help="TOML config with a [cloud] table")
    c.add_argument("--check-config", action="store_true", help="validate and exit")
    c.add_argument("--metrics-port", type=int, default=0, metavar="PORT",
                   help="serve Prometheus /metrics and JSON /health on PORT (0 = off)")
    c.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST",
                   help="address for --metrics-port (127.0.0.1)")
    c.add_argument("--log-format", choices=("console", "json"), help="override [log] format")

    r = sub.add_parser("run", help="agent + cloud ingest in one process (what `make run` does)",
                       formatter_class=raw,
                       description="Run the agent and the embedded cloud ingest together and "
                       "print progress (accepted, buffered, delivered) until stopped.",
                       epilog=_RUN_HELP + _ENV_HELP)
    r.add_argument("--config", required=True, help="TOML config with agent sections and [cloud]")
    r.add_argument("--duration", type=float, default=0.0,
                   help="stop gracefully after this many seconds (0 = run until signalled)")
    r.add_argument("--log-format", choices=("console", "json"),
                   help="override [log] format (json: one JSON object a line, progress too)")

    for name, (_, helptext) in DELEGATES.items():
        d = sub.add_parser(name, help=helptext, add_help=False)
        d.add_argument("args", nargs=argparse.REMAINDER)
    return p


def _install_signals(stop: Callable[[], None], force: Callable[[], None],
                     reload: Callable[[], Any] | None = None) -> None:
    loop = asyncio.get_running_loop()
    hits = {"n": 0}

    def handler() -> None:
        hits["n"] += 1
        (stop if hits["n"] == 1 else force)()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, handler)
    if reload is not None:
        loop.add_signal_handler(signal.SIGHUP, reload)


def _load(path: str) -> dict[str, Any]:
    from pymigrate.configload import load_toml

    return load_toml(path)


def _load_agent(path: str, log_format: str | None) -> tuple[dict[str, Any], Any]:
    """(raw TOML with env overrides, AgentConfig) with every path it names checked."""
    import msgspec

    from agent.envconfig import apply_overrides, check_permissions, parse_with_env
    from agent.preflight import check_paths

    raw = _load(path)
    check_permissions(path, raw)
    data = apply_overrides(raw, os.environ)  # PYMIGRATE__SECTION__KEY=value
    cfg = parse_with_env(data, os.environ, source_file=path)
    if log_format:
        cfg = msgspec.structs.replace(cfg, log=msgspec.structs.replace(cfg.log,
                                                                       format=log_format))
    check_paths(cfg)
    return data, cfg


def _check_agent(path: str) -> int:
    _, cfg = _load_agent(path, None)
    dev = cfg.device.id or "derived from the machine at start"
    print(f"{path}: OK (device {dev}, {len(cfg.sources)} source(s), "
          f"uplink {' -> '.join(cfg.uplink.transports)})")
    return 0


class _Progress:
    """The periodic progress line of ``run`` (and of ``agent`` without metrics): plain
    text for the console format, one JSON log event for the json format."""

    def __init__(self, agent: Any, *, fmt: str, store: Any = None) -> None:
        self.agent = agent
        self.fmt = fmt
        self.store = store
        self.earlier = 0  # readings buffered by earlier runs, delivered by this one

    async def fields(self) -> dict[str, Any]:
        s = self.agent.status()
        out = {"accepted": s["accepted"], "buffered": s["buffered_readings"],
               "chunks": s["buffered_chunks"], "buffer_file_bytes": s["buffer_bytes"],
               "delivered": s["delivered"], "rejected": sum(s["rejected"].values()),
               "duplicates": s["duplicates_dropped"], "evicted": sum(s["evicted"].values())}
        if self.store is not None:
            out["stored_in_cloud"] = await self.store.count()
        return out

    def emit(self, f: dict[str, Any], *, final: bool = False) -> None:
        import structlog

        if self.fmt == "json":
            structlog.get_logger("pymigrate.progress").info(
                "summary" if final else "progress", earlier_backlog=self.earlier, **f)
            return
        if final:
            line = (f"stopped: accepted={f['accepted']} delivered={f['delivered']}"
                    + (f" stored_in_cloud={f['stored_in_cloud']}" if "stored_in_cloud" in f
                       else "")
                    + (f" earlier_backlog={self.earlier}" if self.earlier else ""))
        else:
            line = (f"accepted={f['accepted']} buffered={f['buffered']} "
                    f"(chunks={f['chunks']}, buffer file {f['buffer_file_bytes']} B incl. WAL)"
                    f" delivered={f['delivered']}"
                    + (f" stored_in_cloud={f['stored_in_cloud']}" if "stored_in_cloud" in f
                       else "")
                    + f" rejected={f['rejected']} duplicates={f['duplicates']}"
                    f" evicted={f['evicted']}")
        print(line, flush=True)

    async def run(self, interval_s: float) -> None:
        await self.agent.started.wait()
        s = self.agent.status()  # one synchronous look: what was buffered before we began
        self.earlier = max(0, s["buffered_readings"] + s["delivered"] - s["accepted"])
        while True:
            await asyncio.sleep(interval_s)
            self.emit(await self.fields())


async def _agent_main(path: str, log_format: str | None = None) -> int:
    from agent.envconfig import runtime_info
    from agent.reload import reload_agent
    from agent.supervisor import Agent
    from pymigrate.logsetup import setup_logging

    _, cfg = _load_agent(path, log_format)
    setup_logging(cfg.log.format, cfg.log.level)
    from pymigrate.clock import clock_from_env

    agent = Agent(cfg, clock=clock_from_env())  # PYMIGRATE_CLOCK_OFFSET_MS: test hook
    agent.runtime = runtime_info(os.environ)
    reloads: set[asyncio.Task[Any]] = set()

    def on_sighup() -> None:  # handlers only schedule: the reload runs as a kept task
        t = asyncio.get_running_loop().create_task(reload_agent(agent, path),
                                                   name="agent[reload]")
        reloads.add(t)
        t.add_done_callback(reloads.discard)

    _install_signals(agent.request_stop, agent.force_stop, on_sighup)
    ticker = None
    if not cfg.metrics.enabled:  # no /metrics to ask: say how it goes in the log
        ticker = asyncio.create_task(_Progress(agent, fmt="json").run(
            cfg.pipeline.status_interval_s), name="agent[progress]")
    try:
        await agent.run()
    except asyncio.CancelledError:
        return 1
    finally:
        if ticker is not None:
            ticker.cancel()
    return 0 if agent.stopped_cleanly else 1


def _cloud_data(data: dict[str, Any], log_format: str | None) -> tuple[dict[str, Any], str, str]:
    log = data.get("log", {})
    if not isinstance(log, dict):
        raise ConfigError("log", "must be a table")
    fmt = log_format or log.get("format", "console")
    level = log.get("level", "info")
    if fmt not in ("console", "json"):
        raise ConfigError("log.format", f"must be 'console' or 'json', got {fmt!r}")
    if not isinstance(level, str) or level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError("log.level", f"unknown level {level!r}")
    cloud = data.get("cloud", {})
    if not isinstance(cloud, dict):
        raise ConfigError("cloud", "must be a table")
    return cloud, fmt, level


def _check_cloud_paths(cloud: dict[str, Any]) -> None:
    """The SQLite store (or a ledger) must be creatable where the config says."""
    from agent.preflight import check_writable_dir
    from cloud.config import parse_cloud_config

    cfg = parse_cloud_config(cloud)
    files = {"sqlite": ("cloud.sqlite.path", cfg.sqlite.path)}
    if not cfg.influx.ledger_dsn:  # else the ledger is in PostgreSQL
        files["influx"] = ("cloud.influx.ledger_path", cfg.influx.ledger_path)
    if not cfg.timestream.ledger_dsn:
        files["timestream"] = ("cloud.timestream.ledger_path", cfg.timestream.ledger_path)
    if cfg.store in files:
        from pathlib import Path

        key, path = files[cfg.store]
        p = Path(path)
        if p.exists() and not p.is_file():
            raise ConfigError(key, f"{p} exists and is not a file")
        check_writable_dir(p.parent, key=key)


async def _start_cloud(app: Any, *, serve: bool = False) -> None:
    """Start (or, with ``serve``, run) the ingest; a busy port is a config error naming
    the key to change."""
    from pymigrate.errors import TransportError

    try:
        await (app.run() if serve else app.start())
    except TransportError as exc:
        if exc.reason in ("address_in_use", "bind"):
            raise ConfigError(f"cloud.coap.{exc.attrs.get('bad_key', 'port')}",
                              str(exc)) from None
        raise


async def _cloud_main(path: str, metrics_port: int = 0, metrics_host: str = "127.0.0.1",
                      log_format: str | None = None) -> int:
    from cloud.app import build_cloud_app
    from pymigrate.logsetup import setup_logging

    cloud, fmt, level = _cloud_data(_load(path), log_format)
    _check_cloud_paths(cloud)
    setup_logging(fmt, level)
    app = build_cloud_app(cloud)
    _install_signals(app.request_stop, app.request_stop)
    endpoint = None
    if metrics_port:
        from cloud.metrics import cloud_endpoint

        endpoint = cloud_endpoint(app, metrics_host, metrics_port)
        try:
            await endpoint.start()
        except OSError as exc:
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise ConfigError("--metrics-port", f"cannot listen on {metrics_host}:"
                              f"{metrics_port}: {why}") from None
    try:
        await _start_cloud(app, serve=True)
    finally:
        if endpoint is not None:
            await endpoint.close()
    return 0


async def _run_main(path: str, duration: float, log_format: str | None = None) -> int:
    from agent.supervisor import Agent
    from cloud.app import build_cloud_app
    from pymigrate.logsetup import setup_logging

    data, cfg = _load_agent(path, log_format)
    cloud, _, _ = _cloud_data(data, None)
    _check_cloud_paths(cloud)
    setup_logging(cfg.log.format, cfg.log.level)
    agent = Agent(cfg)  # built before the ingest starts: nothing to undo if it fails
    app = build_cloud_app(cloud)
    await _start_cloud(app)
    progress = _Progress(agent, fmt=cfg.log.format, store=app.store)
    ticker: asyncio.Task[None] | None = None
    try:
        _install_signals(agent.request_stop, agent.force_stop)
        if duration > 0:
            asyncio.get_running_loop().call_later(duration, agent.request_stop)
        ticker = asyncio.create_task(progress.run(cfg.pipeline.status_interval_s),
                                     name="run[progress]")
        await agent.run()
    finally:
        if ticker is not None:
            ticker.cancel()
        try:
            if agent.started.is_set():
                progress.emit(await progress.fields(), final=True)
        finally:
            await app.stop()
    return 0 if agent.stopped_cleanly else 1


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups; a plain exception is its own leaf."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [exc]


def _report(exc: BaseException) -> int | None:
    """Print an error a user can act on and return the exit status; None = a bug (let
    the traceback show)."""
    leaves = _leaves(exc)
    config = [e for e in leaves if isinstance(e, ConfigError)]
    if config:
        for text in dict.fromkeys(str(e) for e in config):
            print(f"config error: {text}", file=sys.stderr)
        return 2
    ours = [e for e in leaves if isinstance(e, PyMigrateError)]
    if ours:
        for e in ours:
            print(f"error ({e.reason}): {e}", file=sys.stderr)
        return 1
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "cloud" and len(argv) > 1 and argv[1] in ("query", "completeness"):
        name = {"query": "cloud.query", "completeness": "cloud.audit"}[argv[1]]
        return int(importlib.import_module(name).main(argv[2:]) or 0)
    if argv and argv[0] in DELEGATES:
        mod = importlib.import_module(DELEGATES[argv[0]][0])
        return int(mod.main(argv[1:]) or 0)
    args = _parser().parse_args(argv)
    try:
        if args.command == "agent":
            path = args.check_config or args.config
            if not path:
                print("pymigrate agent: --config FILE is required", file=sys.stderr)
                return 2
            if args.check_config is not None:
                return _check_agent(path)
            return asyncio.run(_agent_main(path, args.log_format))
        if args.command == "cloud":
            if not args.config:
                print("pymigrate cloud: --config is required", file=sys.stderr)
                return 2
            if args.check_config:
                from cloud.config import parse_cloud_config

                cloud, _, _ = _cloud_data(_load(args.config), None)
                parse_cloud_config(cloud)
                _check_cloud_paths(cloud)
                print(f"{args.config}: OK")
                return 0
            return asyncio.run(_cloud_main(args.config, args.metrics_port, args.metrics_host,
                                           args.log_format))
        if args.command == "run":
            return asyncio.run(_run_main(args.config, args.duration, args.log_format))
    except KeyboardInterrupt:  # pragma: no cover
        return 130
    except Exception as exc:  # ours are reported plainly, a bug re-raised
        rc = _report(exc)
        if rc is None:
            raise
        return rc
    return 2  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
