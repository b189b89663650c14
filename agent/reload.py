"""``SIGHUP``: re-read the config file, validate it, apply what can change live.

A config that does not parse or validate is refused and logged; the running config is
kept untouched. A valid one is diffed key by key against the running one:

* applied live: ``log.*`` (level, format), ``validation.*``, the uploader's run-time
  ``retry`` keys (profile, battery threshold, linger, sync ping, retention, attempts,
  timeouts, ...), ``pipeline.drain_timeout_s`` / ``status_interval_s`` and
  ``metrics.host`` / ``metrics.port`` (the server is re-bound; on failure the old binding
  is restored and the whole reload is refused);
* everything else (device id, sources, buffer, uplink, dedup, aggregation, the
  constructor-bound retry keys, turning metrics on or off ...) is reported as needing a
  restart and left as it runs.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import msgspec
import structlog

from agent.config import AgentConfig
from agent.envconfig import load_config
from pymigrate.errors import PyMigrateError
from pymigrate.logsetup import setup_logging

if TYPE_CHECKING:
    from agent.supervisor import Agent

__all__ = ["LIVE_RETRY_KEYS", "ReloadResult", "diff_keys", "reload_agent"]

log = structlog.get_logger("pymigrate.agent.reload")

# RetryConfig keys the uploader reads at use time (the others were baked into breakers,
# backoff, AIMD and windows at start).
LIVE_RETRY_KEYS = frozenset({
    "profile", "low_battery_pct", "linger_metered_s", "linger_battery_s", "sync_ping_s",
    "power_check_s", "retention_s", "max_attempts", "max_chunks", "probe_max_bytes",
    "throttle_jitter", "reconnect_after_failures", "timeout_initial_s", "timeout_min_s",
    "timeout_max_s"})
LIVE_PIPELINE_KEYS = frozenset({"drain_timeout_s", "status_interval_s"})


class ReloadResult(msgspec.Struct):
    """What a reload did: ``ok`` false means refused (``error`` says why)."""

    ok: bool
    applied: list[str] = msgspec.field(default_factory=list)
    restart_required: list[str] = msgspec.field(default_factory=list)
    error: str = ""


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = value


def diff_keys(old: AgentConfig, new: AgentConfig) -> list[str]:
    """Dotted keys whose value differs (lists compare whole)."""
    a: dict[str, Any] = {}
    b: dict[str, Any] = {}
    _flatten(msgspec.to_builtins(msgspec.structs.replace(old, source_file="")), "", a)
    _flatten(msgspec.to_builtins(msgspec.structs.replace(new, source_file="")), "", b)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def _is_live(key: str) -> bool:
    section, _, rest = key.partition(".")
    if section in ("log", "validation"):
        return True
    if section == "retry":
        return rest in LIVE_RETRY_KEYS
    if section == "pipeline":
        return rest in LIVE_PIPELINE_KEYS
    return section == "metrics" and rest in ("host", "port")


async def reload_agent(agent: Agent, path: str | os.PathLike[str] | None = None, *,
                       env: Mapping[str, str] | None = None,
                       relog: Callable[[str, str], None] = setup_logging) -> ReloadResult:
    """Reload ``path`` (default: the file the agent was started from) into ``agent``."""
    path = path or agent.config.source_file
    if not path:
        return _refuse("the agent was not started from a config file")
    try:
        new = await asyncio.to_thread(_load, path, env)
    except (PyMigrateError, OSError, ValueError) as exc:
        return _refuse(f"{path}: {exc}")
    old = agent.config
    changed = diff_keys(old, new)
    live = [k for k in changed if _is_live(k)]
    restart = [k for k in changed if not _is_live(k)]
    if "metrics.enabled" in restart:
        # metrics turned on/off at the same time: a restart decides the server's fate
        restart += [k for k in live if k.startswith("metrics.")]
        live = [k for k in live if not k.startswith("metrics.")]
    if any(k.startswith("metrics.") for k in live) and agent.metrics is not None:
        try:
            await agent.metrics.rebind_config(new.metrics)
        except OSError as exc:
            return _refuse(f"metrics {new.metrics.host}:{new.metrics.port}: {exc}")
    applied = _apply(agent, old, new, live, relog)
    if restart:
        log.warning("config reloaded: some changes need a restart", applied=applied,
                    restart_required=restart)
    else:
        log.info("config reloaded", applied=applied)
    return ReloadResult(ok=True, applied=applied, restart_required=restart)


def _load(path: str | os.PathLike[str], env: Mapping[str, str] | None) -> AgentConfig:
    if os.path.getsize(path) == 0:  # an editor truncating before it writes
        raise ValueError("empty file (still being written?)")
    return load_config(path, env)


def _refuse(error: str) -> ReloadResult:
    log.error("config reload refused: keeping the running config", error=error)
    return ReloadResult(ok=False, error=error)


def _apply(agent: Agent, old: AgentConfig, new: AgentConfig, live: list[str],
           relog: Callable[[str, str], None]) -> list[str]:
    replace = msgspec.structs.replace
    sections = {k.partition(".")[0] for k in live}
    cfg = old
    if "log" in sections:
        relog(new.log.format, new.log.level)
        cfg = replace(cfg, log=new.log)
    if "validation" in sections:
        agent.validator.config = new.validation
        cfg = replace(cfg, validation=new.validation)
    if "retry" in sections:
        retry = replace(old.retry, **{k: getattr(new.retry, k) for k in LIVE_RETRY_KEYS})
        agent.uploader.cfg = retry
        power = agent.uploader.power
        power.low_battery_pct = retry.low_battery_pct
        power.update(profile=retry.profile)
        cfg = replace(cfg, retry=retry)
    if "pipeline" in sections:
        cfg = replace(cfg, pipeline=replace(old.pipeline, **{
            k: getattr(new.pipeline, k) for k in LIVE_PIPELINE_KEYS}))
    if "metrics" in sections:
        cfg = replace(cfg, metrics=new.metrics)
    agent.config = cfg
    return live
