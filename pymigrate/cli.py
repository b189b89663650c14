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
                   help="validate the config (FILE or --config) and exit: 0 valid, 2 invalid")

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

    r = sub.add_parser("run", help="agent + cloud ingest in one process (what `make run` does)",
                       formatter_class=raw,
                       description="Run the agent and the embedded cloud ingest together and "
                       "print progress (accepted, buffered, delivered) until stopped.",
                       epilog=_RUN_HELP + _ENV_HELP)
    r.add_argument("--config", required=True, help="TOML config with agent sections and [cloud]")
    r.add_argument("--duration", type=float, default=0.0,
                   help="stop gracefully after this many seconds (0 = run until signalled)")

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


def _check_agent(path: str) -> int:
    from agent.envconfig import load_config  # file + PYMIGRATE__* / framework env overrides

    cfg = load_config(path)
    dev = cfg.device.id or "derived from the machine at start"
    print(f"{path}: OK (device {dev}, {len(cfg.sources)} source(s), "
          f"uplink {' -> '.join(cfg.uplink.transports)})")
    return 0


async def _agent_main(path: str) -> int:
    import os

    from agent.envconfig import load_config, runtime_info
    from agent.reload import reload_agent
    from agent.supervisor import Agent
    from pymigrate.logsetup import setup_logging

    cfg = load_config(path)
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
    try:
        await agent.run()
    except asyncio.CancelledError:
        return 1
    return 0 if agent.stopped_cleanly else 1


async def _cloud_main(path: str, metrics_port: int = 0, metrics_host: str = "127.0.0.1") -> int:
    from cloud.app import build_cloud_app
    from pymigrate.logsetup import setup_logging

    data = _load(path)
    log = data.get("log", {})
    setup_logging(log.get("format", "console"), log.get("level", "info"))
    app = build_cloud_app(data.get("cloud", {}))
    _install_signals(app.request_stop, app.request_stop)
    if metrics_port:
        from cloud.metrics import cloud_endpoint

        endpoint = cloud_endpoint(app, metrics_host, metrics_port)
        await endpoint.start()
        try:
            await app.run()
        finally:
            await endpoint.close()
        return 0
    await app.run()
    return 0


async def _run_main(path: str, duration: float) -> int:
    import os

    from agent.config import parse_agent_config
    from agent.envconfig import apply_overrides
    from agent.supervisor import Agent
    from cloud.app import build_cloud_app
    from pymigrate.logsetup import setup_logging

    data = apply_overrides(_load(path), os.environ)  # PYMIGRATE__SECTION__KEY=value
    cfg = parse_agent_config(data, source_file=path)
    setup_logging(cfg.log.format, cfg.log.level)
    app = build_cloud_app(data.get("cloud", {}))
    await app.start()
    agent = Agent(cfg)
    _install_signals(agent.request_stop, agent.force_stop)
    if duration > 0:
        asyncio.get_running_loop().call_later(duration, agent.request_stop)

    async def progress() -> None:
        while True:
            await asyncio.sleep(cfg.pipeline.status_interval_s)
            s = agent.status()
            stored = await app.store.count()
            print(f"accepted={s['accepted']} buffered={s['buffered_readings']} "
                  f"(chunks={s['buffered_chunks']}, {s['buffer_bytes']} B) "
                  f"delivered={s['delivered']} stored_in_cloud={stored} "
                  f"rejected={sum(s['rejected'].values())} evicted={sum(s['evicted'].values())}",
                  flush=True)

    ticker = asyncio.create_task(progress(), name="run[progress]")
    try:
        await agent.run()
    finally:
        ticker.cancel()
        stored = await app.store.count()
        print(f"stopped: accepted={agent.ingest.counts['accepted']} "
              f"delivered={agent.uploader.stats().get('readings_acked', 0)} "
              f"stored_in_cloud={stored}", flush=True)
        await app.stop()
    return 0 if agent.stopped_cleanly else 1


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
            return asyncio.run(_agent_main(path))
        if args.command == "cloud":
            if not args.config:
                print("pymigrate cloud: --config is required", file=sys.stderr)
                return 2
            if args.check_config:
                from cloud.config import parse_cloud_config

                parse_cloud_config(_load(args.config).get("cloud", {}))
                print(f"{args.config}: OK")
                return 0
            return asyncio.run(_cloud_main(args.config, args.metrics_port, args.metrics_host))
        if args.command == "run":
            return asyncio.run(_run_main(args.config, args.duration))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except PyMigrateError as exc:
        print(f"error ({exc.reason}): {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # pragma: no cover
        return 130
    return 2  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
