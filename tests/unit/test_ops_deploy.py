"""Deployment files, checked statically (no Docker engine, no Greengrass, no IoT Edge here):
systemd units (plus ``systemd-analyze verify`` when installed), Dockerfile, compose file,
Greengrass v2 recipe and Azure IoT Edge deployment manifest against their documented
structure, and the annotated example configs through ``pymigrate agent --check-config``."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.envconfig import apply_overrides, load_config
from pymigrate.cli import main as cli_main
from transports.config import parse_transport

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"


def _unit(name: str) -> dict[str, dict[str, list[str]]]:
    """systemd unit file -> {section: {key: [values]}} (repeatable keys keep every value)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = ""
    for raw in (CONFIGS / "systemd" / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            out.setdefault(section, {})
            continue
        key, _, value = line.partition("=")
        out[section].setdefault(key.strip(), []).append(value.strip())
    return out


def test_agent_unit_directives() -> None:
    u = _unit("pymigrate-agent.service")
    s = {k: v[-1] for k, v in u["Service"].items()}
    assert s["Type"] == "notify" and s["NotifyAccess"] == "main"
    assert re.fullmatch(r"\d+s?", s["WatchdogSec"]) and int(s["WatchdogSec"].rstrip("s")) >= 10
    assert s["Restart"] in ("on-failure", "always")
    assert s["User"] == "pymigrate" and s["Group"] == "pymigrate"
    assert s["ProtectSystem"] == "strict"
    assert s["StateDirectory"] == "pymigrate"
    assert s["NoNewPrivileges"] == "yes"
    assert s["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert "--check-config" in s["ExecStartPre"]
    assert s["CapabilityBoundingSet"] == ""
    env = dict(e.split("=", 1) for e in u["Service"]["Environment"])
    assert env["PYMIGRATE__LOG__FORMAT"] == "json"  # JSON lines for journald
    assert env["PYMIGRATE__DEVICE__DATA_DIR"] == "/var/lib/pymigrate"  # = StateDirectory
    # the drain deadline must fit inside systemd's stop timeout
    assert int(s["TimeoutStopSec"].rstrip("s")) > 10 + 5
    assert u["Install"]["WantedBy"] == ["multi-user.target"]


def test_cloud_unit_directives() -> None:
    s = {k: v[-1] for k, v in _unit("pymigrate-cloud.service")["Service"].items()}
    assert s["User"] == "pymigrate" and s["ProtectSystem"] == "strict"
    assert s["NoNewPrivileges"] == "yes" and s["Restart"] == "on-failure"


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    exe = Path(sys.executable).parent / "pymigrate"
    if not exe.exists():
        pytest.skip("the pymigrate console script is not installed in this venv")
    units = []
    for src in (CONFIGS / "systemd").glob("*.service"):
        dst = tmp_path / src.name  # ExecStart must point at an existing executable
        dst.write_text(src.read_text().replace("/opt/pymigrate/venv/bin/pymigrate", str(exe)))
        units.append(str(dst))
    assert len(units) == 2
    res = subprocess.run([tool, "verify", "--man=no", *units], capture_output=True, text=True,
                         timeout=60, check=False)
    assert res.returncode == 0 and not res.stderr.strip(), res.stderr


def _dockerfile() -> list[tuple[str, str]]:
    text = (CONFIGS / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_slim_nonroot_healthcheck() -> None:
    ins = _dockerfile()
    froms = [r for i, r in ins if i == "FROM"]
    assert froms and all("-slim" in f for f in froms)
    final = max(i for i, (k, _) in enumerate(ins) if k == "FROM")
    tail = ins[final:]
    users = [r for k, r in tail if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    health = [r for k, r in tail if k == "HEALTHCHECK"]
    assert health and "pymigrate" in health[0] and "status" in health[0]
    assert any(k == "ENTRYPOINT" and "pymigrate" in r for k, r in tail)
    assert ("STOPSIGNAL", "SIGTERM") in tail
    # every COPY source exists in the build context (the repository root)
    for k, r in ins:
        if k == "COPY" and "--from=" not in r:
            srcs = [a for a in r.split() if not a.startswith("--")][:-1]
            for src in srcs:
                assert (ROOT / src).exists(), src
    env = " ".join(r for k, r in tail if k == "ENV")
    assert "PYMIGRATE__LOG__FORMAT=json" in env and "PYMIGRATE__METRICS__ENABLED=true" in env


def test_compose_fleet() -> None:
    doc: dict[str, Any] = yaml.safe_load((CONFIGS / "docker" / "compose.yaml").read_text())
    svc = doc["services"]
    assert {"broker", "cloud", "device"} <= set(svc)
    dev = svc["device"]
    assert str(dev["deploy"]["replicas"]).startswith("${DEVICES")
    assert dev["environment"]["PYMIGRATE_DEVICE_ID_FROM"] == "hostname"
    assert dev["environment"]["PYMIGRATE__UPLINK__MQTT__HOST"] == "broker"
    assert dev["depends_on"]["broker"]["condition"] == "service_healthy"
    assert "volumes" not in dev  # one anonymous volume per replica (the image's VOLUME)
    for name in ("cloud", "device"):
        assert svc[name]["read_only"] is True and svc[name]["cap_drop"] == ["ALL"]
        assert svc[name]["command"][0] in ("agent", "cloud")
    assert "--metrics-port" in svc["cloud"]["command"]
    assert "9109/health" in " ".join(svc["cloud"]["healthcheck"]["test"])
    build = svc["cloud"]["build"]
    assert (CONFIGS / "docker" / build["context"] / build["dockerfile"]).resolve() == \
        (CONFIGS / "docker" / "Dockerfile").resolve()
    # the env the device containers get turns the image's agent config into a valid one
    from pymigrate.configload import load_toml

    data = apply_overrides(load_toml(str(CONFIGS / "agent-mqtt.toml")),
                           {k: str(v) for k, v in dev["environment"].items()})
    from agent.config import parse_agent_config

    cfg = parse_agent_config(data)
    assert parse_transport("mqtt", cfg.uplink.mqtt).host == "broker"


def test_greengrass_recipe_structure() -> None:
    r: dict[str, Any] = yaml.safe_load((CONFIGS / "greengrass" / "recipe.yaml").read_text())
    assert r["RecipeFormatVersion"] == "2020-01-25"
    assert re.fullmatch(r"[A-Za-z0-9.\-_]+", r["ComponentName"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", r["ComponentVersion"])
    assert set(r) <= {"RecipeFormatVersion", "ComponentName", "ComponentVersion",
                      "ComponentType", "ComponentDescription", "ComponentPublisher",
                      "ComponentSource", "ComponentConfiguration", "ComponentDependencies",
                      "Manifests", "Lifecycle"}
    for dep in r["ComponentDependencies"].values():
        assert dep["DependencyType"] in ("HARD", "SOFT") and dep["VersionRequirement"]
    defaults = r["ComponentConfiguration"]["DefaultConfiguration"]
    assert r["Manifests"]
    for m in r["Manifests"]:
        assert m["Platform"]["os"] in ("linux", "windows", "darwin", "*")
        life = m["Lifecycle"]
        assert set(life) <= {"Setenv", "bootstrap", "install", "startup", "run", "shutdown",
                             "recover"}
        assert "run" in life and "pymigrate agent --config" in life["run"]["Script"]
        for art in m["Artifacts"]:
            assert re.match(r"(s3|greengrass|docker)://", art["URI"])
        env = life["Setenv"]
        assert all(k.startswith(("PYMIGRATE__", "PYTHON")) for k in env)
        for v in env.values():  # configuration references point at real defaults
            for ref in re.findall(r"\{configuration:/(\w+)\}", str(v)):
                assert ref in defaults
        # with Greengrass' own variables the recipe's env yields a valid agent config
        resolved = {k: re.sub(r"\{configuration:/(\w+)\}", lambda mm: str(defaults[mm[1]]),
                              str(v)).replace("{work:path}", "/greengrass/work")
                    for k, v in env.items()}
        resolved.update({"AWS_IOT_THING_NAME": "gg-core-7", "SVCUID": "x",
                         "AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT": "/ipc.sock"})
        cfg = load_config(CONFIGS / "agent-mqtt.toml", env=resolved)
        assert cfg.device.id == "gg-core-7"
        assert cfg.device.data_dir == "/greengrass/work/state"
        assert cfg.log.format == "json" and cfg.metrics.port == 9108


def test_azure_deployment_manifest_structure() -> None:
    doc = json.loads((CONFIGS / "azure" / "deployment.json").read_text())
    mc = doc["modulesContent"]
    agent = mc["$edgeAgent"]["properties.desired"]
    assert agent["schemaVersion"] in ("1.0", "1.1")
    assert agent["runtime"]["type"] == "docker"
    assert "minDockerVersion" in agent["runtime"]["settings"]
    sysm = agent["systemModules"]
    assert {"edgeAgent", "edgeHub"} == set(sysm)
    assert sysm["edgeHub"]["status"] == "running" and sysm["edgeHub"]["restartPolicy"]
    for m in [*sysm.values(), *agent["modules"].values()]:
        assert m["type"] == "docker" and m["settings"]["image"]
        json.loads(m["settings"].get("createOptions", "{}"))  # a JSON string, per the schema
    mod = agent["modules"]["pymigrateAgent"]
    assert mod["status"] in ("running", "stopped")
    assert mod["restartPolicy"] in ("never", "on-failure", "on-unhealthy", "always")
    env = {k: v["value"] for k, v in mod["env"].items()}
    opts = json.loads(mod["settings"]["createOptions"])
    assert opts["User"] != "root" and opts["HostConfig"]["ReadonlyRootfs"] is True
    hub = mc["$edgeHub"]["properties.desired"]
    assert hub["schemaVersion"] in ("1.0", "1.1", "1.2") and "routes" in hub
    assert hub["storeAndForwardConfiguration"]["timeToLiveSecs"] > 0
    # IoT Edge's own variables + the manifest's env give a valid agent config
    env.update({"IOTEDGE_DEVICEID": "edge-gw-9", "IOTEDGE_MODULEID": "pymigrateAgent",
                "IOTEDGE_GATEWAYHOSTNAME": "edge-gw-9.local"})
    cfg = load_config(CONFIGS / "agent-mqtt.toml", env=env)
    assert cfg.device.id == "edge-gw-9" and cfg.metrics.host == "0.0.0.0"
    mqtt = parse_transport("mqtt", cfg.uplink.mqtt)
    assert mqtt.host == "broker.example.com" and mqtt.use_tls


@pytest.mark.parametrize("name", ["agent-mqtt.toml", "agent-coap.toml", "agent-amqp.toml",
                                  "default.toml"])
def test_example_configs_pass_check_config(name: str, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    for var in [v for v in __import__("os").environ if v.startswith("PYMIGRATE__")]:
        monkeypatch.delenv(var)
    path = CONFIGS / name
    assert cli_main(["agent", "--check-config", str(path)]) == 0
    assert f"{path}: OK" in capsys.readouterr().out
    cfg = load_config(path, env={})
    for t in cfg.uplink.transports:  # the transport sections validate against their schema
        parse_transport(t, getattr(cfg.uplink, t))


def test_example_configs_are_annotated() -> None:
    for name in ("agent-mqtt.toml", "agent-coap.toml", "agent-amqp.toml"):
        text = (CONFIGS / name).read_text()
        lines = [ln for ln in text.splitlines() if "=" in ln and not ln.startswith("#")]
        commented = [ln for ln in lines if "#" in ln]
        assert len(commented) >= len(lines) // 2, name


def test_check_config_rejects_a_typo_in_a_transport_table(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text((CONFIGS / "agent-mqtt.toml").read_text().replace(
        'host = "127.0.0.1"        # e.g.', 'hots = "127.0.0.1"        # e.g.'))
    assert cli_main(["agent", "--check-config", str(bad)]) == 2
    assert "hots" in capsys.readouterr().err


def test_check_config_rejects_a_bad_file(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text((CONFIGS / "agent-coap.toml").read_text().replace('"battery"', '"solar"'))
    assert cli_main(["agent", "--check-config", str(bad)]) == 2
    assert "retry.profile" in capsys.readouterr().err


def test_agent_help_reads_like_a_manual(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ei:
        cli_main(["agent", "--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    for section in ("signals:", "SIGHUP", "systemd:", "metrics:", "files:", "exit status:",
                    "environment:", "PYMIGRATE__SECTION__KEY", "AWS_IOT_THING_NAME"):
        assert section in out, section


def test_compose_cloud_config_is_valid(capsys: pytest.CaptureFixture[str]) -> None:
    path = CONFIGS / "docker" / "cloud.toml"
    assert cli_main(["cloud", "--config", str(path), "--check-config"]) == 0
    from pymigrate.configload import load_toml

    mqtt = load_toml(str(path))["cloud"]["mqtt"]
    assert parse_transport("mqtt", mqtt, section="cloud").host == "broker"
