"""``pymigrate fleet ...``: status, dry-run, serve, devices, groups, rollouts, keygen.

Wired by the main CLI as ``pymigrate fleet`` -> :func:`main`; ``--help`` shows
:data:`DESCRIPTION` (plain text, no markup).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from cloud.fleet.coordinator import PENDING, Coordinator, control_document
from cloud.fleet.metrics import FleetMetrics
from cloud.fleet.registry import Group, Registry
from cloud.fleet.sim import FleetModel, dry_run, summary
from cloud.fleet.spec import RolloutSpec, derive_plan, parse_spec, predict_seconds, wave_sizes
from cloud.fleet.states import TERMINAL, DeviceState
from cloud.fleet.store import FleetStore, LeaseLost, RolloutRecord, open_store
from pymigrate.clock import WallClock
from pymigrate.configload import convert, load_toml
from pymigrate.errors import ConfigError, PyMigrateError
from transports.jobs_mqtt import MqttJobChannel, control_topic, publish_once, tls_context
from transports.jobs_security import (
    SecretError,
    check_config_content,
    generate_keypair,
    load_private_key,
    load_public_key,
)

_ENC = msgspec.json.Encoder()
EXIT_LEASE_LOST = 3

DESCRIPTION = """Fleet coordinator: device registry and groups, rollouts in waves with health gates,
rollback, dry runs. Offline commands work on the state store (--store: a SQLite path, or a
postgresql:// DSN whose optional ?fleet_schema=NAME picks the schema). Commands for a
running coordinator (pause, resume, cancel, abort, and --broker on create-rollout,
add-devices, add-group) go over MQTT to <prefix>/fleet/control, signed with
--signing-key (the coordinator accepts only commands signed by its --control-key).

Job backends: 'serve' sends jobs over its own MQTT topics (--backend mqtt, the default)
or through AWS IoT Jobs (--backend aws-iot-jobs: one IoT job per wave, no broker needed;
credentials and region from the usual AWS environment, profile or role). On AWS, abort
and cancel take --backend aws-iot-jobs --store URL and cancel the rollout's current job;
pause and resume are not available there (AWS IoT jobs cannot be paused)."""

EPILOG = """high availability:
  run several 'serve' replicas (same --backend) on one postgresql:// store: one is
  active (it holds the store's lease; every write carries its fencing token), the others
  wait and take over within seconds when it dies. SQLite is single-node: a second
  'serve' is refused.

exit status:
  0 ok, 1 a command failed (message on stderr), 2 invalid usage or option value,
  3 'serve' lost its lease to another replica"""


def _print(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def load_spec_file(path: str) -> dict[str, Any]:
    """A rollout spec from TOML or JSON; a ``[rollout]`` table is used when present."""
    if not Path(path).is_file():
        raise ConfigError("--spec", f"rollout spec file {path} does not exist")
    data = (json.loads(Path(path).read_text()) if path.endswith(".json")
            else load_toml(path))
    inner = data.get("rollout", data)
    return dict(inner) if isinstance(inner, dict) else data


def _broker(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError("--broker", f"expected HOST:PORT, got {text!r}")
    return (host or "127.0.0.1"), int(port)


def _tls(args: argparse.Namespace) -> Any:
    return tls_context("--ca-file/--cert-file/--key-file", getattr(args, "ca_file", ""),
                       getattr(args, "cert_file", ""), getattr(args, "key_file", ""))


async def _send_control(args: argparse.Namespace, cmd: str, **fields: Any) -> dict[str, Any]:
    """Publish one signed control command to a running coordinator."""
    key = (load_private_key(args.signing_key, key="--signing-key") if args.signing_key
           else None)
    host, port = _broker(args.broker)
    body = control_document(cmd, key, int(time.time() * 1000), **fields)
    await publish_once(host, port, control_topic(args.prefix), body, tls=_tls(args))
    return {"cmd": cmd, **fields, "signed": key is not None}


async def _with_store(url: str, fn: Any) -> Any:
    store = open_store(url)
    await store.open()
    try:
        return await fn(store)
    finally:
        await store.close()


async def _status(args: argparse.Namespace) -> dict[str, Any]:
    async def run(store: FleetStore) -> dict[str, Any]:
        reg = Registry()
        reg.load_rows(await store.load_devices())
        out: dict[str, Any] = {"fleet": reg.export(), "rollouts": []}
        for rec in await store.load_rollouts():
            if args.rollout and rec.rollout_id != args.rollout:
                continue
            counts = await store.state_counts(rec.rollout_id)
            waves = json.loads(rec.waves)
            # target order is registry order: rebuild positions to count states per wave
            states = await store.load_device_states(rec.rollout_id)
            rows = sorted((reg.get_index(r.device_id) or 0, r.state, _progress(r.state,
                                                                             r.progress))
                          for r in states)
            per_wave = []
            for w in waves:
                c: dict[str, int] = {}
                part = rows[w["start"]:w["end"]]
                for _, st, _p in part:
                    name = DeviceState(st).name.lower()
                    c[name] = c.get(name, 0) + 1
                per_wave.append({"wave": w["index"], "size": w["end"] - w["start"],
                                 "gate": w["gate"], "states": c,
                                 "progress": round(sum(p for *_, p in part) / len(part), 4)
                                 if part else 0.0,
                                 **({"job_id": w["job_id"], "executions": w["counts"]}
                                    if "job_id" in w else {})})
            if getattr(args, "show_devices", False):
                out.setdefault("device_progress", {})[rec.rollout_id] = [
                    {"device_id": r.device_id, "state": DeviceState(r.state).name.lower(),
                     "attempts": r.attempts, "progress": _progress(r.state, r.progress),
                     **({"phase": r.detail} if r.detail else {})}
                    for r in sorted(states, key=lambda x: x.device_id)]
            total = sum(counts.values())
            done = sum(n for s, n in counts.items() if DeviceState(s) in TERMINAL)
            elapsed = max(0.001, (rec.finished_ms or rec.updated_ms) - rec.created_ms) / 1000
            eta = None if not done else round((total - done) * elapsed / done, 1)
            succ = counts.get(DeviceState.SUCCEEDED, 0)
            fail = sum(counts.get(s, 0) for s in (DeviceState.FAILED, DeviceState.TIMED_OUT,
                                                   DeviceState.REJECTED))
            if args.list_state:  # e.g. which devices were skipped as offline
                want = DeviceState[args.list_state.upper()]
                listed = sorted(r.device_id for r in await store.load_device_states(
                    rec.rollout_id) if r.state == want)
                out.setdefault("devices", {})[rec.rollout_id] = listed
            out["rollouts"].append({
                "rollout_id": rec.rollout_id, "status": rec.status, "reason": rec.reason,
                "backend": rec.backend or "mqtt",
                **(json.loads(rec.backend_state) if rec.backend_state else {}),
                "devices": total,
                "states": {DeviceState(s).name.lower(): n for s, n in sorted(counts.items())},
                "success_rate": round(succ / (succ + fail), 4) if succ + fail else None,
                "progress": round(sum(p for *_, p in rows) / len(rows), 4) if rows else 0.0,
                "eta_s": eta, "waves": per_wave,
                "transitions": await store.transition_count(rec.rollout_id),
                "updated_ms": rec.updated_ms})
        return out

    return dict(await _with_store(args.store, run))


def _progress(state: int, progress: float) -> float:
    """A device's progress for status: 1 once it reported success."""
    if state in (DeviceState.SOAKING, DeviceState.SUCCEEDED):
        return 1.0
    return round(float(progress), 4)


async def _announce(args: argparse.Namespace, store: FleetStore) -> dict[str, Any]:
    """Tell running coordinators the registry changed (PostgreSQL NOTIFY; with --broker
    also a signed ``load`` command, the way for SQLite)."""
    await store.notify_changes()
    if getattr(args, "broker", None):
        return {"notified": await _send_control(args, "load")}
    return {}


def _read_devices(path: str) -> list[dict[str, Any]]:
    text = Path(path).read_text()
    return (json.loads(text) if text.lstrip().startswith("[")
            else [json.loads(line) for line in text.splitlines() if line.strip()])


async def _add_devices(args: argparse.Namespace) -> dict[str, Any]:
    items = _read_devices(args.file)

    async def run(store: FleetStore) -> dict[str, Any]:
        reg = Registry()
        reg.load_rows(await store.load_devices())
        idxs = [reg.add(str(d["device_id"]), d.get("attrs", {})) for d in items]
        await store.save_devices([reg.row(i) for i in idxs])
        return {"added": len(idxs), **await _announce(args, store)}

    return dict(await _with_store(args.store, run))


async def _add_group(args: argparse.Namespace) -> dict[str, Any]:
    selector = None
    if args.select:
        selector = {}
        for item in args.select:
            k, _, v = item.partition("=")
            selector[k] = v.split("|") if "|" in v else v
    group = Group(args.name, tuple(args.members.split(",")) if args.members else (), selector)

    async def run(store: FleetStore) -> dict[str, Any]:
        await store.save_group(group)
        return await _announce(args, store)

    extra = await _with_store(args.store, run)
    return {"group": msgspec.to_builtins(group), **extra}


def check_document(spec: RolloutSpec) -> None:
    """A config job must not carry secrets in clear (``${secret:NAME}`` references only)."""
    if spec.document.type == "config":
        try:
            check_config_content(spec.document.content)
        except SecretError as exc:
            raise ConfigError("rollout.document.content", str(exc)) from exc
    elif spec.document.hook == "firmware":
        from cloud.fleet.firmware import check_firmware_document

        check_firmware_document(spec.document)


async def _aws_rollout(args: argparse.Namespace) -> dict[str, Any]:
    """Run one rollout through AWS IoT Jobs in the foreground (see cloud.fleet.cli_aws)."""
    from cloud.fleet.cli_aws import aws_rollout

    spec = parse_spec(load_spec_file(args.spec))
    check_document(spec)
    return await aws_rollout(args, spec)


async def _create(args: argparse.Namespace) -> dict[str, Any]:
    spec = parse_spec(load_spec_file(args.spec))
    check_document(spec)
    now = int(time.time() * 1000)
    rec = RolloutRecord(spec.rollout_id, _ENC.encode(spec).decode(),
                        _ENC.encode(spec.plan).decode(), PENDING, created_ms=now,
                        updated_ms=now)

    async def run(store: FleetStore) -> None:
        await store.save_rollout(rec)
        await store.notify_changes()  # a coordinator on PostgreSQL starts it at once

    await _with_store(args.store, run)
    out: dict[str, Any] = {"created": spec.rollout_id, "status": PENDING}
    if args.broker:
        out["notified"] = await _send_control(args, "load")
    return out


async def _control(args: argparse.Namespace) -> dict[str, Any]:
    if args.backend == "aws-iot-jobs":
        from cloud.fleet.cli_aws import aws_control

        return await aws_control(args)
    if not args.broker:
        raise ConfigError("--broker", "the mqtt backend needs the coordinator's broker"
                          " (--broker HOST:PORT)")
    return {"sent": await _send_control(args, args.cmd, rollout_id=args.rollout)}


def _keygen(args: argparse.Namespace) -> dict[str, Any]:
    priv, pub = generate_keypair(args.out, args.name)
    return {"private_key": str(priv), "public_key": str(pub)}


def _mqtt_coordinator(args: argparse.Namespace, store: FleetStore) -> Coordinator:
    """The built-in backend: jobs on the coordinator's own MQTT topics."""
    host, port = _broker(args.broker)
    signing = (load_private_key(args.signing_key, key="--signing-key") if args.signing_key
               else None)
    control_key = (load_public_key(args.control_key, key="--control-key")
                   if args.control_key else None)
    metrics = FleetMetrics()
    holder: dict[str, Coordinator] = {}

    async def control(payload: bytes) -> None:
        await holder["c"].handle_control(payload)

    channel = MqttJobChannel(host, port, prefix=args.prefix, control=control, tls=_tls(args))
    coord = holder["c"] = Coordinator(store=store, channel=channel, clock=WallClock(),
                                      metrics=metrics, signing_key=signing,
                                      control_key=control_key,
                                      insecure_control=args.insecure_control)
    if signing is None:
        sys.stderr.write("pymigrate fleet serve: warning: no --signing-key, job documents are"
                         " unsigned (agents with jobs.verify_key refuse them)\n")
    if args.metrics_port:  # pragma: no cover - binds a real port
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port, registry=metrics.registry)
    return coord


def _aws_coordinator(args: argparse.Namespace, store: FleetStore) -> Any:
    from cloud.fleet.cli_aws import aws_coordinator

    return aws_coordinator(args, store)


#: ``serve --backend NAME`` -> builder of the coordinator service
BACKENDS = {"mqtt": _mqtt_coordinator, "aws-iot-jobs": _aws_coordinator}


async def serve(args: argparse.Namespace, stop: asyncio.Event | None = None,
                started: asyncio.Future[Any] | None = None) -> int:
    """Run the coordinator of ``--backend`` until ``stop`` is set (default: SIGINT /
    SIGTERM)."""
    store = open_store(args.store)
    await store.open()
    code = 0
    try:
        coord = BACKENDS[getattr(args, "backend", "mqtt")](args, store)
        if stop is None:  # pragma: no cover - the CLI process
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
        starting = asyncio.ensure_future(coord.start())  # a standby waits for the lease here
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # stopped while standing by
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            return 0
        starting.result()
        try:
            await coord.load_pending()
            if started is not None:
                started.set_result(coord)
            failed = asyncio.ensure_future(coord.failed.wait())
            await asyncio.wait({stopping, failed}, return_when=asyncio.FIRST_COMPLETED)
            failed.cancel()
            if coord.error is not None:
                code = EXIT_LEASE_LOST if isinstance(coord.error, LeaseLost) else 1
                sys.stderr.write(f"pymigrate fleet serve: stopping: {coord.error!r}\n")
        finally:
            stopping.cancel()
            await coord.stop()
    finally:
        await store.close()
    return code


def _dry_run(args: argparse.Namespace) -> dict[str, Any]:
    spec = (parse_spec(load_spec_file(args.spec)) if args.spec
            else RolloutSpec(rollout_id="dry-run"))
    check_document(spec)
    model = convert({"devices": args.devices, "online_fraction": args.online,
                     "failure_rate": args.failure, "update_min_s": args.update_min,
                     "update_max_s": args.update_max, "seed": args.seed}, FleetModel,
                    section="model")
    plan, feasible = (derive_plan(model.devices, spec) if spec.deadline_s > 0
                      else (spec.plan, True))
    res = summary(dry_run(spec, model))
    res["plan"] = {"waves": wave_sizes(model.devices, plan), "growth": plan.growth,
                   "feasible_for_deadline": feasible,
                   "planned_minutes": round(predict_seconds(model.devices, plan, spec) / 60, 1)}
    return res


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _fraction(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= x <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in 0..1, got {text}")
    return x


def _seconds(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not x >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 seconds, got {text}")
    return x


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of ``pymigrate fleet``."""
    p = argparse.ArgumentParser(prog="pymigrate fleet", description=DESCRIPTION,
                                epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_store(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--store", default="fleet.db",
                        help="state store: SQLite path (default fleet.db) or postgresql://"
                             " DSN (?fleet_schema=NAME picks the schema)")

    def with_tls(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--ca-file", default="", help="CA certificate (PEM) of the broker")
        sp.add_argument("--cert-file", default="", help="client certificate (PEM)")
        sp.add_argument("--key-file", default="", help="client certificate's private key")

    def with_broker(sp: argparse.ArgumentParser, required: bool, signs: bool) -> None:
        sp.add_argument("--broker", required=required, default=None,
                        help="MQTT broker HOST:PORT" + (
                            "" if required else " (tell the running coordinator)"))
        sp.add_argument("--prefix", default="pymigrate",
                        help="topic prefix (default pymigrate)")
        with_tls(sp)
        if signs:
            sp.add_argument("--signing-key", default="",
                            help="Ed25519 private key (PEM) signing the control command; "
                                 "the coordinator refuses unsigned ones")

    s = sub.add_parser("status", help="fleet health and rollout progress from the store")
    with_store(s)
    s.add_argument("--rollout", default="", help="only this rollout")
    s.add_argument("--list-state", default="", choices=["", *(x.name.lower() for x in
                                                            DeviceState)],
                   help="also list the device ids in this state (e.g. skipped, failed)")
    s.add_argument("--show-devices", action="store_true",
                   help="also show each device's state, attempts and progress")
    s = sub.add_parser("dry-run", help="simulate a rollout against a fleet model")
    s.add_argument("--spec", default="",
                   help="rollout spec (TOML or JSON; default: the built-in default spec,"
                        " see configs/fleet/rollout-example.toml)")
    s.add_argument("--devices", type=_count, default=10_000,
                   help="fleet size to simulate (>= 1, default 10000)")
    s.add_argument("--online", type=_fraction, default=0.95,
                   help="fraction of devices online at the start, 0..1 (default 0.95)")
    s.add_argument("--failure", type=_fraction, default=0.02,
                   help="fraction of devices whose update fails, 0..1 (default 0.02)")
    s.add_argument("--update-min", type=_seconds, default=60.0,
                   help="shortest device update, seconds (default 60)")
    s.add_argument("--update-max", type=_seconds, default=300.0,
                   help="longest device update, seconds (default 300)")
    s.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    def with_aws(sp: argparse.ArgumentParser, polls: bool) -> None:
        sp.add_argument("--region", default="",
                        help="AWS region (default: the AWS environment or profile)")
        sp.add_argument("--profile", default="",
                        help="AWS profile (default: the AWS environment or default profile)")
        if polls:
            sp.add_argument("--poll-s", type=_seconds, default=30.0,
                            help="seconds between reads of a job's executions, and at most"
                                 " between looks for new rollouts (default 30)")

    s = sub.add_parser("serve", help="run the coordinator (MQTT job topics or AWS IoT Jobs)")
    with_store(s)
    s.add_argument("--backend", choices=sorted(BACKENDS), default="mqtt",
                   help="how jobs reach devices: mqtt (default, the coordinator's own topics"
                        " on --broker) or aws-iot-jobs (one AWS IoT job per wave; --broker"
                        " and the key options are not used)")
    with_broker(s, False, False)
    s.set_defaults(broker="127.0.0.1:1883")
    with_aws(s, True)
    s.add_argument("--metrics-port", type=int, default=0,
                   help="serve Prometheus metrics on this port (0 = off)")
    s.add_argument("--signing-key", default="",
                   help="Ed25519 private key (PEM) signing every job document")
    s.add_argument("--control-key", default="",
                   help="Ed25519 public key (PEM) that control commands must be signed by")
    s.add_argument("--insecure-control", action="store_true",
                   help="accept unsigned control commands (tests only)")
    s = sub.add_parser("add-devices", help="register devices from JSON / JSON lines")
    with_store(s)
    with_broker(s, False, True)
    s.add_argument("--file", required=True,
                   help='JSON list or JSON lines of {"device_id": ..., "attrs": {...}}')
    s = sub.add_parser("add-group", help="static (--members) or dynamic (--select) group")
    with_store(s)
    with_broker(s, False, True)
    s.add_argument("--name", required=True, help="group name")
    s.add_argument("--members", default="", help="static group: comma-separated device ids")
    s.add_argument("--select", action="append", default=[],
                   help="dynamic group: attr=pattern[|pattern] (fnmatch; repeatable, all"
                        " must match)")
    s = sub.add_parser("create-rollout", help="store a rollout; started by the coordinator")
    with_store(s)
    with_broker(s, False, True)
    s.add_argument("--spec", required=True, help="rollout spec file (TOML or JSON)")
    for cmd in ("pause", "resume", "cancel", "abort"):
        aws = {"abort": " (aws-iot-jobs: cancel its current job, then roll back)",
               "cancel": " (aws-iot-jobs: cancel its current job, no rollback)"}.get(
                   cmd, " (mqtt backend only)")
        s = sub.add_parser(cmd, help=f"{cmd} a rollout on the running coordinator{aws}")
        s.add_argument("--backend", choices=sorted(BACKENDS), default="mqtt",
                       help="backend running the rollout: mqtt (default; needs --broker) or"
                            " aws-iot-jobs (needs --store; abort and cancel only)")
        with_broker(s, False, True)
        with_store(s)
        with_aws(s, False)
        s.add_argument("--rollout", required=True, help="rollout id")
        s.set_defaults(cmd=cmd)
    s = sub.add_parser("aws-rollout",
                       help="run one rollout through AWS IoT Jobs in the foreground (stored;"
                            " running it again continues it)")
    with_store(s)
    s.add_argument("--spec", required=True, help="rollout spec file (TOML or JSON)")
    with_aws(s, True)
    s = sub.add_parser("sign-firmware",
                       help="print the signed [rollout.document] of a firmware image")
    s.add_argument("image", help="firmware image file")
    s.add_argument("--key", required=True, help="release Ed25519 private key (PEM)")
    s.add_argument("--url", required=True, help="http(s) URL devices download the image from")
    s.add_argument("--version", required=True, help="firmware version")
    s = sub.add_parser("keygen", help="create an Ed25519 key pair (job or control signing)")
    s.add_argument("--out", default=".", help="directory for NAME.key and NAME.pub")
    s.add_argument("--name", default="fleet-signing", help="file name stem")
    return p


def main(argv: list[str]) -> int:
    """Run one ``pymigrate fleet`` command; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "status" and "://" not in args.store and not Path(args.store).exists():
        sys.stderr.write(f"pymigrate fleet status: no fleet store at {args.store} (relative "
                         f"to {Path.cwd()}); pass --store with the file or DSN that "
                         "'pymigrate fleet serve' uses\n")
        return 2  # reading must not create an empty store here
    try:
        if args.command == "dry-run":
            _print(_dry_run(args))
        elif args.command == "keygen":
            _print(_keygen(args))
        elif args.command == "sign-firmware":
            from cloud.fleet.firmware import sign_firmware

            doc = sign_firmware(args.image, url=args.url, version=args.version,
                                key_file=args.key)
            _print({"document": msgspec.to_builtins(doc)})
        elif args.command == "serve":
            return asyncio.run(serve(args))
        else:
            fn = {"status": _status, "add-devices": _add_devices, "add-group": _add_group,
                  "create-rollout": _create, "aws-rollout": _aws_rollout}.get(
                      args.command, _control)
            _print(asyncio.run(fn(args)))
    except ConfigError as exc:  # a bad option value or file: usage error
        sys.stderr.write(f"pymigrate fleet {args.command}: {exc}\n")
        return 2
    except (PyMigrateError, OSError, ValueError) as exc:
        sys.stderr.write(f"pymigrate fleet {args.command}: {exc}\n")
        return 1
    return 0
