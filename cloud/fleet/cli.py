"""``pymigrate fleet ...``: status, dry-run, serve, devices, groups, rollouts.

Wired by the main CLI as ``pymigrate fleet`` -> :func:`main`. Offline commands work on
the state store directly (``--store``: a SQLite path or a ``postgresql://`` DSN);
commands for a running coordinator (pause/resume/cancel/abort, and ``create-rollout
--broker``) go over MQTT to ``<prefix>/fleet/control``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from cloud.fleet.coordinator import PENDING, Coordinator
from cloud.fleet.metrics import FleetMetrics
from cloud.fleet.registry import Group, Registry
from cloud.fleet.sim import FleetModel, dry_run, summary
from cloud.fleet.spec import RolloutSpec, derive_plan, parse_spec, predict_seconds, wave_sizes
from cloud.fleet.states import TERMINAL, DeviceState
from cloud.fleet.store import FleetStore, RolloutRecord, open_store
from pymigrate.clock import WallClock
from pymigrate.configload import convert, load_toml
from pymigrate.errors import PyMigrateError
from transports.jobs_mqtt import MqttJobChannel, control_topic, publish_once

_ENC = msgspec.json.Encoder()


def _print(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def load_spec_file(path: str) -> dict[str, Any]:
    """A rollout spec from TOML or JSON; a ``[rollout]`` table is used when present."""
    data = (json.loads(Path(path).read_text()) if path.endswith(".json")
            else load_toml(path))
    inner = data.get("rollout", data)
    return dict(inner) if isinstance(inner, dict) else data


def _broker(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return (host or "127.0.0.1"), int(port or 1883)


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
            rows = sorted((reg.get_index(r.device_id) or 0, r.state)
                          for r in await store.load_device_states(rec.rollout_id))
            per_wave = []
            for w in waves:
                c: dict[str, int] = {}
                for _, st in rows[w["start"]:w["end"]]:
                    name = DeviceState(st).name.lower()
                    c[name] = c.get(name, 0) + 1
                per_wave.append({"wave": w["index"], "size": w["end"] - w["start"],
                                 "gate": w["gate"], "states": c})
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
                "devices": total,
                "states": {DeviceState(s).name.lower(): n for s, n in sorted(counts.items())},
                "success_rate": round(succ / (succ + fail), 4) if succ + fail else None,
                "eta_s": eta, "waves": per_wave,
                "transitions": await store.transition_count(rec.rollout_id),
                "updated_ms": rec.updated_ms})
        return out

    return dict(await _with_store(args.store, run))


def _read_devices(path: str) -> list[dict[str, Any]]:
    text = Path(path).read_text()
    return (json.loads(text) if text.lstrip().startswith("[")
            else [json.loads(line) for line in text.splitlines() if line.strip()])


async def _add_devices(args: argparse.Namespace) -> dict[str, Any]:
    items = _read_devices(args.file)

    async def run(store: FleetStore) -> int:
        reg = Registry()
        reg.load_rows(await store.load_devices())
        idxs = [reg.add(str(d["device_id"]), d.get("attrs", {})) for d in items]
        await store.save_devices([reg.row(i) for i in idxs])
        return len(idxs)

    return {"added": await _with_store(args.store, run)}


async def _add_group(args: argparse.Namespace) -> dict[str, Any]:
    selector = None
    if args.select:
        selector = {}
        for item in args.select:
            k, _, v = item.partition("=")
            selector[k] = v.split("|") if "|" in v else v
    group = Group(args.name, tuple(args.members.split(",")) if args.members else (), selector)

    async def run(store: FleetStore) -> None:
        await store.save_group(group)

    await _with_store(args.store, run)
    return {"group": msgspec.to_builtins(group)}


async def _create(args: argparse.Namespace) -> dict[str, Any]:
    spec = parse_spec(load_spec_file(args.spec))
    now = int(time.time() * 1000)
    rec = RolloutRecord(spec.rollout_id, _ENC.encode(spec).decode(),
                        _ENC.encode(spec.plan).decode(), PENDING, created_ms=now,
                        updated_ms=now)

    async def run(store: FleetStore) -> None:
        await store.save_rollout(rec)

    await _with_store(args.store, run)
    if args.broker:
        host, port = _broker(args.broker)
        await publish_once(host, port, control_topic(args.prefix), b'{"cmd":"load"}')
    return {"created": spec.rollout_id, "status": PENDING}


async def _control(args: argparse.Namespace) -> dict[str, Any]:
    host, port = _broker(args.broker)
    body = {"cmd": args.cmd, "rollout_id": args.rollout}
    await publish_once(host, port, control_topic(args.prefix), json.dumps(body).encode())
    return {"sent": body}


async def serve(args: argparse.Namespace, stop: asyncio.Event | None = None,
                started: asyncio.Future[Coordinator] | None = None) -> int:
    """Run the coordinator on MQTT until ``stop`` is set (default: SIGINT / SIGTERM)."""
    host, port = _broker(args.broker)
    store = open_store(args.store)
    await store.open()
    metrics = FleetMetrics()
    holder: dict[str, Coordinator] = {}

    async def control(payload: bytes) -> None:
        await holder["c"].handle_control(payload)

    channel = MqttJobChannel(host, port, prefix=args.prefix, control=control)
    coord = holder["c"] = Coordinator(store=store, channel=channel, clock=WallClock(),
                                      metrics=metrics)
    if args.metrics_port:  # pragma: no cover - binds a real port
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port, registry=metrics.registry)
    if stop is None:  # pragma: no cover - the CLI process
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    try:
        async with coord:
            await coord.load_pending()
            if started is not None:
                started.set_result(coord)
            await stop.wait()
    finally:
        await store.close()
    return 0


def _dry_run(args: argparse.Namespace) -> dict[str, Any]:
    spec = (parse_spec(load_spec_file(args.spec)) if args.spec
            else RolloutSpec(rollout_id="dry-run"))
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


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of ``pymigrate fleet``."""
    p = argparse.ArgumentParser(prog="pymigrate fleet", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def with_store(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--store", default="fleet.db", help="SQLite path or postgresql:// DSN")

    def with_broker(sp: argparse.ArgumentParser, required: bool) -> None:
        sp.add_argument("--broker", required=required, default=None,
                        help="MQTT broker host:port")
        sp.add_argument("--prefix", default="pymigrate", help="topic prefix")

    s = sub.add_parser("status", help="fleet health and rollout progress from the store")
    with_store(s)
    s.add_argument("--rollout", default="")
    s.add_argument("--list-state", default="", choices=["", *(x.name.lower() for x in
                                                            DeviceState)],
                   help="also list the device ids in this state (e.g. skipped, failed)")
    s = sub.add_parser("dry-run", help="simulate a rollout against a fleet model")
    s.add_argument("--spec", default="")
    s.add_argument("--devices", type=int, default=10_000)
    s.add_argument("--online", type=float, default=0.95)
    s.add_argument("--failure", type=float, default=0.02)
    s.add_argument("--update-min", type=float, default=60.0)
    s.add_argument("--update-max", type=float, default=300.0)
    s.add_argument("--seed", type=int, default=1)
    s = sub.add_parser("serve", help="run the coordinator on MQTT job topics")
    with_store(s)
    with_broker(s, False)
    s.set_defaults(broker="127.0.0.1:1883")
    s.add_argument("--metrics-port", type=int, default=0)
    s = sub.add_parser("add-devices", help="register devices from JSON / JSON lines")
    with_store(s)
    s.add_argument("--file", required=True)
    s = sub.add_parser("add-group", help="static (--members) or dynamic (--select) group")
    with_store(s)
    s.add_argument("--name", required=True)
    s.add_argument("--members", default="")
    s.add_argument("--select", action="append", default=[], help="attr=pattern[|pattern]")
    s = sub.add_parser("create-rollout", help="store a rollout; started by the coordinator")
    with_store(s)
    with_broker(s, False)
    s.add_argument("--spec", required=True)
    for cmd in ("pause", "resume", "cancel", "abort"):
        s = sub.add_parser(cmd, help=f"{cmd} a rollout on the running coordinator")
        with_broker(s, True)
        s.add_argument("--rollout", required=True)
        s.set_defaults(cmd=cmd)
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
        elif args.command == "serve":
            return asyncio.run(serve(args))
        else:
            fn = {"status": _status, "add-devices": _add_devices, "add-group": _add_group,
                  "create-rollout": _create}.get(args.command, _control)
            _print(asyncio.run(fn(args)))
    except (PyMigrateError, OSError, ValueError) as exc:
        sys.stderr.write(f"pymigrate fleet {args.command}: {exc}\n")
        return 1
    return 0
