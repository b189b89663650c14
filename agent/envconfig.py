"""Environment -> config overrides: edge frameworks, containers and systemd drop-ins.

Precedence, lowest to highest: the TOML file, the identity an edge framework hands the
process, then explicit ``PYMIGRATE__SECTION__KEY=value`` variables.

* **AWS IoT Greengrass v2** sets ``AWS_IOT_THING_NAME`` (-> ``device.id``), ``AWS_REGION``,
  the IPC socket ``AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT`` and its secret
  ``SVCUID``, ``GG_ROOT_CA_PATH`` and the token-exchange URI.
* **Azure IoT Edge** sets ``IOTEDGE_DEVICEID`` (-> ``device.id``), ``IOTEDGE_MODULEID``,
  ``IOTEDGE_GATEWAYHOSTNAME``, ``IOTEDGE_IOTHUBHOSTNAME``, ``IOTEDGE_WORKLOADURI`` ...
* **Containers**: ``PYMIGRATE_DEVICE_ID_FROM=hostname`` takes ``device.id`` from the host
  name (a compose replica's container id).
* **Generic**: ``PYMIGRATE__METRICS__PORT=9200``, ``PYMIGRATE__UPLINK__MQTT__HOST=broker``,
  ``PYMIGRATE__SOURCES__0__INTERVAL_S=5``. Values are read as TOML values when they parse
  (``true``, ``9200``, ``["mqtt", "coap"]``), as plain strings otherwise.

The framework facts (what runs us, IPC socket, module id; secrets only as "set") are kept
in :func:`runtime_info` for the health endpoint. :func:`load_config` is the one entry
point the CLI and SIGHUP reload use; it also warns when a file holding secrets is
readable by group or others.
"""

from __future__ import annotations

import copy
import os
import socket
import stat
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog

from agent.config import AgentConfig, parse_agent_config
from pymigrate.configload import load_toml
from pymigrate.errors import ConfigError

__all__ = ["PREFIX", "apply_overrides", "check_permissions", "env_overrides", "load_config",
           "parse_with_env", "runtime_info"]

log = structlog.get_logger("pymigrate.agent.envconfig")

PREFIX = "PYMIGRATE__"
SECRET_KEYS = ("password", "token", "key_file", "secret", "private_key")
GREENGRASS = {"thing_name": "AWS_IOT_THING_NAME", "region": "AWS_REGION",
              "nucleus_version": "GGC_VERSION", "root_ca": "GG_ROOT_CA_PATH",
              "ipc_socket": "AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT",
              "credentials_uri": "AWS_CONTAINER_CREDENTIALS_FULL_URI"}
GREENGRASS_SECRETS = {"svcuid": "SVCUID", "credentials_token": "AWS_CONTAINER_AUTHORIZATION_TOKEN"}
AZURE = {"device_id": "IOTEDGE_DEVICEID", "module_id": "IOTEDGE_MODULEID",
         "gateway_host": "IOTEDGE_GATEWAYHOSTNAME", "iothub_host": "IOTEDGE_IOTHUBHOSTNAME",
         "workload_uri": "IOTEDGE_WORKLOADURI", "api_version": "IOTEDGE_APIVERSION",
         "auth_scheme": "IOTEDGE_AUTHSCHEME", "generation_id": "IOTEDGE_MODULEGENERATIONID"}


def _value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _set(tree: dict[str, Any], path: list[str], value: Any, var: str) -> None:
    node: Any = tree
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(var, f"index {part!r} is not an existing list entry")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(var, f"{'.'.join(path[:i])} is not a table")
        if last:
            node[part] = value
        else:
            node = node.setdefault(part, {})


def env_overrides(env: Mapping[str, str]) -> list[tuple[str, list[str], Any]]:
    """(source variable, key path, value) overrides found in ``env``, in precedence order."""
    out: list[tuple[str, list[str], Any]] = []
    explicit_id = f"{PREFIX}DEVICE__ID" in env
    if not explicit_id:
        for var in ("AWS_IOT_THING_NAME", "IOTEDGE_DEVICEID"):
            if env.get(var):
                out.append((var, ["device", "id"], env[var]))
                break
        else:
            if env.get("PYMIGRATE_DEVICE_ID_FROM", "").lower() == "hostname":
                # one container per simulated device: the container id is the device id
                out.append(("PYMIGRATE_DEVICE_ID_FROM", ["device", "id"], socket.gethostname()))
    for var in sorted(env):
        if var.startswith(PREFIX) and len(var) > len(PREFIX):
            path = [p.lower() for p in var[len(PREFIX):].split("__")]
            if any(not p for p in path):
                raise ConfigError(var, "empty key segment (use SECTION__KEY)")
            out.append((var, path, _value(env[var])))
    return out


def apply_overrides(data: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """A copy of the parsed TOML mapping with the environment's overrides applied."""
    merged = copy.deepcopy(data)
    for var, path, value in env_overrides(env):
        _set(merged, path, value, var)
    return merged


def runtime_info(env: Mapping[str, str]) -> dict[str, Any]:
    """What runs the agent (greengrass / azure-iot-edge / systemd / container / none) and
    the framework's settings; secret values only as ``"set"``."""
    info: dict[str, Any] = {}
    if env.get("AWS_IOT_THING_NAME") or env.get("SVCUID"):
        info["framework"] = "greengrass"
        info.update({k: env[v] for k, v in GREENGRASS.items() if env.get(v)})
        info.update({k: "set" for k, v in GREENGRASS_SECRETS.items() if env.get(v)})
    elif env.get("IOTEDGE_DEVICEID") or env.get("IOTEDGE_MODULEID"):
        info["framework"] = "azure-iot-edge"
        info.update({k: env[v] for k, v in AZURE.items() if env.get(v)})
    elif env.get("NOTIFY_SOCKET") or env.get("INVOCATION_ID"):
        info["framework"] = "systemd"
    elif env.get("PYMIGRATE_CONTAINER") or Path("/.dockerenv").exists():
        info["framework"] = "container"
    else:
        info["framework"] = "none"
    return info


def _secret_keys(data: Any, prefix: str = "") -> list[str]:
    found: list[str] = []
    if isinstance(data, dict):
        for k, v in data.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if any(s in str(k).lower() for s in SECRET_KEYS) and isinstance(v, str) and v:
                found.append(key)
            else:
                found.extend(_secret_keys(v, key))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            found.extend(_secret_keys(v, f"{prefix}[{i}]"))
    return found


def check_permissions(path: str | os.PathLike[str], data: Mapping[str, Any]) -> list[str]:
    """Secret keys of ``data`` when ``path`` is group/world-readable (warned), else []."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return []
    if not mode & (stat.S_IRGRP | stat.S_IROTH):
        return []
    keys = _secret_keys(dict(data))
    if keys:
        log.warning("config file holding secrets is readable by group/others; chmod 600 it",
                    path=str(path), mode=oct(stat.S_IMODE(mode)), keys=keys)
    return keys


def _segments(key: str) -> list[str]:
    return [p for p in key.replace("[", ".").replace("]", "").split(".") if p]


def parse_with_env(data: dict[str, Any], env: Mapping[str, str], *,
                   source_file: str = "") -> AgentConfig:
    """:func:`parse_agent_config` of ``data`` (already overridden from ``env``); an error
    about a key that an environment variable set names that variable too, since the
    file is then not where the bad value is."""
    try:
        return parse_agent_config(data, source_file=source_file)
    except ConfigError as exc:
        key = _segments(str(exc.key))
        for var, path, _ in reversed(env_overrides(env)):
            n = min(len(key), len(path))
            if key and key[:n] == path[:n]:
                raise ConfigError(str(exc.key), f"{exc.problem} (set by the environment "
                                  f"variable {var}={env[var]!r}: fix or unset it)") from None
        raise


def load_config(path: str | os.PathLike[str],
                env: Mapping[str, str] | None = None) -> AgentConfig:
    """Load, override from the environment, validate (ConfigError names the key),
    including the ``[uplink.<transport>]`` table of every transport in use."""
    from transports.config import parse_transport

    env = os.environ if env is None else env
    data = load_toml(str(path))
    check_permissions(path, data)
    cfg = parse_with_env(apply_overrides(data, env), env, source_file=str(path))
    for name in cfg.uplink.transports:
        parse_transport(name, getattr(cfg.uplink, name))
    return cfg
