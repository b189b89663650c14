"""``pymigrate fleet`` commands that need no broker: dry-run, registry, rollouts, status."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cloud.fleet.cli import build_parser, load_spec_file, main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, object]:
    assert main(list(argv)) == 0
    out: dict[str, object] = json.loads(capsys.readouterr().out)
    return out


def test_dry_run_prints_prediction(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    spec = tmp_path / "spec.toml"
    spec.write_text('[rollout]\nrollout_id = "fw-2"\nsoak_s = 60\n'
                    "max_notifications_per_min = 2000\ndeadline_s = 3600\noffline_wait_s = 600\n"
                    "[rollout.gate]\nmin_executed = 10\nsuccess_threshold = 0.9\n")
    out = run(capsys, "dry-run", "--spec", str(spec), "--devices", "2000", "--failure", "0.02")
    assert out["status"] == "completed"
    assert out["peak_notifications_per_minute"] <= 2000  # type: ignore[operator]
    plan = out["plan"]
    assert isinstance(plan, dict) and plan["feasible_for_deadline"] is True
    assert sum(plan["waves"]) == 2000
    out = run(capsys, "dry-run", "--devices", "500", "--failure", "0.4")
    assert out["status"] == "rolled_back" and out["gate_verdicts"] == ["failed"]


def test_registry_rollout_and_status(capsys: pytest.CaptureFixture[str],
                                     tmp_path: Path) -> None:
    db = str(tmp_path / "fleet.db")
    devs = tmp_path / "devices.jsonl"
    devs.write_text("\n".join(json.dumps({"device_id": f"d{i}", "attrs": {
        "region": "eu" if i % 2 else "us"}}) for i in range(6)) + "\n")
    assert run(capsys, "add-devices", "--store", db, "--file", str(devs)) == {"added": 6}
    devs2 = tmp_path / "more.json"
    devs2.write_text(json.dumps([{"device_id": "x1"}]))
    assert run(capsys, "add-devices", "--store", db, "--file", str(devs2)) == {"added": 1}
    out = run(capsys, "add-group", "--store", db, "--name", "eu", "--select", "region=eu|eu-*")
    assert out["group"]["selector"] == {"region": ["eu", "eu-*"]}  # type: ignore[index]
    run(capsys, "add-group", "--store", db, "--name", "pair", "--members", "d0,d1")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"rollout_id": "cfg-7", "group": "eu",
                                "document": {"content": "x = 1\n"}}))
    assert run(capsys, "create-rollout", "--store", db, "--spec", str(spec)) == {
        "created": "cfg-7", "status": "pending"}
    out = run(capsys, "status", "--store", db)
    assert out["fleet"]["devices"] == 7  # type: ignore[index]
    assert out["rollouts"][0]["status"] == "pending"  # type: ignore[index]
    out = run(capsys, "status", "--store", db, "--rollout", "other")
    assert out["rollouts"] == []


def test_errors_exit_nonzero_with_message(capsys: pytest.CaptureFixture[str],
                                          tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('rollout_id = "r"\n[plan]\ngrowth = 0.1\n')
    assert main(["dry-run", "--spec", str(bad), "--devices", "10"]) == 2  # bad config
    assert "rollout.plan.growth" in capsys.readouterr().err
    assert main(["add-devices", "--store", str(tmp_path / "f.db"),
                 "--file", str(tmp_path / "missing.json")]) == 1
    assert load_spec_file(str(bad))["rollout_id"] == "r"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["pause"])  # --broker and --rollout are required


def test_help_is_plain_and_every_option_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text and ":func:" not in text and ":data:" not in text
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, sp in sub.choices.items():  # type: ignore[union-attr]
        for action in sp._actions:
            if action.dest != "help":
                assert action.help, f"fleet {name} {action.option_strings} has no help"


@pytest.mark.parametrize(("argv", "option", "problem"), [
    (["--devices", "-5"], "--devices", ">= 1"),
    (["--devices", "0"], "--devices", ">= 1"),
    (["--devices", "many"], "--devices", "whole number"),
    (["--online", "2", "--failure", "7"], "--online", "0..1"),
    (["--failure", "7"], "--failure", "0..1"),
    (["--update-min", "-1"], "--update-min", ">= 0"),
])
def test_dry_run_validation_names_the_option(capsys: pytest.CaptureFixture[str],
                                             argv: list[str], option: str,
                                             problem: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["dry-run", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and problem in err and "Traceback" not in err


def test_missing_spec_file_says_so(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["dry-run", "--spec", str(tmp_path / "nope.toml")]) == 2
    err = capsys.readouterr().err
    assert "--spec" in err and "does not exist" in err


def test_rollout_with_a_secret_in_clear_is_refused(capsys: pytest.CaptureFixture[str],
                                                  tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"rollout_id": "s", "document": {
        "content": '[uplink.mqtt]\npassword = "hunter2"\n'}}))
    assert main(["create-rollout", "--store", str(tmp_path / "f.db"), "--spec", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "uplink.mqtt.password" in err and "${secret:NAME}" in err
    spec.write_text(json.dumps({"rollout_id": "s", "document": {
        "content": '[uplink.mqtt]\npassword = "${secret:mqtt}"\n'}}))
    assert run(capsys, "create-rollout", "--store", str(tmp_path / "f.db"), "--spec",
               str(spec))["created"] == "s"


def test_keygen_writes_a_key_pair(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = run(capsys, "keygen", "--out", str(tmp_path), "--name", "k")
    assert Path(str(out["private_key"])).stat().st_mode & 0o077 == 0
    assert Path(str(out["public_key"])).read_text().startswith("-----BEGIN PUBLIC KEY")


ROOT = Path(__file__).resolve().parents[2]


def test_default_spec_updates_10000_devices_within_the_hour(
        capsys: pytest.CaptureFixture[str]) -> None:
    out = run(capsys, "dry-run", "--devices", "10000")
    assert out["status"] == "completed"
    assert out["simulated_minutes_to_complete"] < 60  # type: ignore[operator]
    assert out["peak_notifications_per_minute"] <= 1000  # type: ignore[operator]
    limits = out["limits_minutes"]
    assert isinstance(limits, dict) and out["bound_by"] == max(limits, key=limits.get)


def test_example_spec_is_the_documented_default() -> None:
    import msgspec

    from cloud.fleet.spec import RolloutSpec, parse_spec

    spec = parse_spec(load_spec_file(str(ROOT / "configs/fleet/rollout-example.toml")))
    default = RolloutSpec(rollout_id=spec.rollout_id, group=spec.group, document=spec.document)
    assert spec == default  # the example shows the defaults, key by key
    from transports.jobs_security import check_config_content

    check_config_content(spec.document.content)  # secrets only as references
    assert "${secret:" in spec.document.content
    assert msgspec.structs.asdict(spec.plan)["growth"] == 4.0
