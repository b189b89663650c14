"""Signed job documents and control commands, secrets kept off the wire, and a device
that crashed mid-apply: the device refuses what the coordinator did not sign, and the
coordinator refuses control commands not signed by the operator's key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from agent.jobs import JobsClient
from cloud.fleet.channel import MemoryJobBus
from cloud.fleet.coordinator import Control, Coordinator, control_document
from cloud.fleet.protocol import (
    Health,
    JobDocument,
    JobNotify,
    JobResult,
    JobUpdate,
    decode,
    encode,
)
from cloud.fleet.spec import Gate, RolloutSpec, WavePlan
from cloud.fleet.store_sqlite import SqliteFleetStore
from pymigrate.clock import VirtualClock
from pymigrate.errors import ConfigError
from tests.support.fleet import CoordinatorClock
from transports.jobs_security import (
    SecretError,
    SignatureError,
    check_config_content,
    generate_keypair,
    load_private_key,
    load_public_key,
    resolve_secrets,
    secrets_in_clear,
    sign,
    verify,
)


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Any]:
    priv, pub = generate_keypair(tmp_path / "k", "jobs")
    other, _ = generate_keypair(tmp_path / "k", "other")
    return {"priv": load_private_key(priv), "pub": load_public_key(pub),
            "other": load_private_key(other), "pub_path": pub}


def test_signature_binds_every_field(keys: dict[str, Any]) -> None:
    msg = sign(JobNotify("j", "d1", "apply", 0, JobDocument(content="a = 1\n",
                                                            args={"x": [1.5, "y"]})),
               keys["priv"])
    verify(decode("notify", encode(msg)), keys["pub"])  # survives the wire
    for forged in (msgspec.structs.replace(msg, device_id="d2"),
                   msgspec.structs.replace(msg, attempt=1),
                   msgspec.structs.replace(msg, doc=JobDocument(content="a = 2\n")),
                   sign(JobNotify("j", "d1"), keys["other"])):
        with pytest.raises(SignatureError) as exc:
            verify(forged, keys["pub"])
        assert exc.value.reason == "bad_signature"
    with pytest.raises(SignatureError) as exc:
        verify(JobNotify("j", "d1"), keys["pub"])
    assert exc.value.reason == "unsigned"
    with pytest.raises(ConfigError, match="verify key"):
        load_public_key(Path("/nonexistent.pub"))


def test_secrets_in_clear_are_found_and_references_resolved() -> None:
    cfg = {"uplink": {"mqtt": {"password": "p", "ca_file": "/x"}},
           "db": {"dsn": "postgresql://u:pw@h/db"}, "jobs": {"secrets_file": "/s"},
           "x": [{"api_key": "k"}], "ok": {"token": "${secret:t}"}}
    assert sorted(secrets_in_clear(cfg)) == ["db.dsn", "uplink.mqtt.password", "x[0].api_key"]
    with pytest.raises(SecretError) as exc:
        check_config_content('[a]\npassword = "hunter2"\n')
    assert exc.value.reason == "secret_in_clear"
    with pytest.raises(SecretError):
        check_config_content("not toml = = =")
    check_config_content("not toml = = =", require_toml=False)
    text = resolve_secrets('p = "${secret:a}"\n', {"a": 'q"uo\\te'})
    assert text == 'p = "q\\"uo\\\\te"\n'
    with pytest.raises(SecretError) as exc:
        resolve_secrets('p = "${secret:missing}"', {})
    assert exc.value.reason == "unknown_secret"


class Dev:
    """A JobsClient on the in-memory bus, with what the coordinator side heard."""

    def __init__(self, tmp: Path, verify_key: Any, secrets: Path | None = None) -> None:
        self.bus = MemoryJobBus()
        self.got: list[Any] = []
        self.cfg = tmp / "agent.toml"
        self.cfg.write_text("v = 1\n")
        self.applied: list[str] = []
        self.client = JobsClient("d1", channel=self.bus.link("d1"),
                                 apply_config=lambda p: self.applied.append(p.read_text()),
                                 health=lambda: Health(), clock=VirtualClock(),
                                 config_path=self.cfg, check_delay_s=0, soak_reports=0,
                                 verify_key=verify_key, secrets_file=secrets)

    async def start(self) -> None:
        async def handler(dev: str, kind: str, payload: bytes) -> None:
            self.got.append(decode(kind, payload))

        await self.bus.start(handler)
        await self.client.start()

    async def send(self, msg: JobNotify) -> None:
        await self.bus.send("d1", "notify", encode(msg))
        for _ in range(20):
            await self.client.clock.settle()  # type: ignore[attr-defined]


async def test_device_refuses_unsigned_and_forged_jobs_and_reports_why(
        tmp_path: Path, keys: dict[str, Any]) -> None:
    secrets = tmp_path / "secrets.toml"
    secrets.write_text('pw = "s3cret"\n')
    dev = Dev(tmp_path, keys["pub"], secrets)
    await dev.start()
    doc = JobDocument(content='v = 2\npassword = "${secret:pw}"\n')
    await dev.send(JobNotify("j1", "d1", "apply", 0, doc))  # unsigned
    forged = msgspec.structs.replace(sign(JobNotify("j1", "d1", "apply", 0, doc),
                                          keys["priv"]),
                                     doc=JobDocument(content="v = 666\n"))
    await dev.send(forged)
    assert dev.applied == [] and dev.cfg.read_text() == "v = 1\n"
    assert dev.client.untrusted == {"unsigned": 1, "bad_signature": 1}
    notes = [m.refused for m in dev.got if isinstance(m, JobUpdate) and m.refused]
    assert notes == ["unsigned:j1", "bad_signature:j1"]  # reported, no job state touched
    assert not [m for m in dev.got if isinstance(m, JobResult)]
    await dev.send(sign(JobNotify("j1", "d1", "apply", 0, doc), keys["priv"]))
    assert dev.cfg.read_text() == 'v = 2\npassword = "s3cret"\n'  # resolved on the device
    assert dev.cfg.stat().st_mode & 0o077 == 0
    results = [m for m in dev.got if isinstance(m, JobResult)]
    assert [r.status for r in results] == ["succeeded"]
    # a config carrying a secret in clear is rejected by the device too
    await dev.send(sign(JobNotify("j2", "d1", "apply", 0,
                                  JobDocument(content='token = "abc"\n')), keys["priv"]))
    last = [m for m in dev.got if isinstance(m, JobResult)][-1]
    assert (last.job_id, last.status, last.reason) == ("j2", "rejected", "secret_in_clear")
    await dev.client.stop()


async def test_job_interrupted_mid_apply_restores_previous_config(
        tmp_path: Path, keys: dict[str, Any]) -> None:
    # state left by a device that died after saving .prev and marking the job applying
    (tmp_path / "agent.toml.prev").write_text("v = 1\n")
    (tmp_path / "agent.toml.jobs.json").write_text(json.dumps(
        {"j1": {"attempt": 0, "status": "applying", "reason": ""}}))
    dev = Dev(tmp_path, None)
    dev.cfg.write_text("v = 2\n")  # half-applied
    await dev.start()
    await dev.send(JobNotify("j1", "d1", "apply", 0, JobDocument(content="v = 2\n")))
    assert dev.cfg.read_text() == "v = 1\n" and dev.client.interrupted == 1
    r = [m for m in dev.got if isinstance(m, JobResult)][-1]
    assert (r.status, r.reason, r.retriable) == ("failed", "interrupted", True)
    # the coordinator's retry (next attempt) applies once, on the restored config
    await dev.send(JobNotify("j1", "d1", "apply", 1, JobDocument(content="v = 2\n")))
    # restored (and reloaded) once, then the job applied once
    assert dev.cfg.read_text() == "v = 2\n" and dev.applied == ["v = 1\n", "v = 2\n"]
    assert (tmp_path / "agent.toml.prev").read_text() == "v = 1\n"
    await dev.client.stop()


async def test_coordinator_accepts_only_signed_fresh_control(tmp_path: Path,
                                                            keys: dict[str, Any]) -> None:
    store = SqliteFleetStore(str(tmp_path / "f.db"))
    await store.open()
    clock = CoordinatorClock()
    coord = Coordinator(store=store, channel=MemoryJobBus(), clock=clock,
                        control_key=keys["pub"], signing_key=keys["priv"])
    clock.coordinators = [coord]
    await coord.start()
    try:
        await coord.add_devices([("d0", {})])
        r = await coord.create_rollout(RolloutSpec("r", plan=WavePlan(canary=1),
                                                   gate=Gate(min_executed=1)))
        now = clock.time_ms()
        await coord.handle_control(control_document("pause", None, now, rollout_id="r"))
        await coord.handle_control(control_document("pause", keys["other"], now,
                                                    rollout_id="r"))
        stale = control_document("pause", keys["priv"], now - 3_600_000, rollout_id="r")
        await coord.handle_control(stale)
        assert coord.rejected == 3 and r.status == "running"
        good = control_document("pause", keys["priv"], now, rollout_id="r")
        await coord.handle_control(good)
        assert r.status == "paused"
        coord.resume("r")
        await coord.handle_control(good)  # replayed
        assert coord.rejected == 4 and r.status == "running"
        body = msgspec.json.decode(good, type=Control)
        assert body.sig and body.nonce
        # notifications leave signed
        await coord.drain()
        sent = [decode("notify", p) for _, _, p in coord.channel.sent]  # type: ignore[attr-defined]
        for m in sent:
            assert isinstance(m, JobNotify)
            verify(m, keys["pub"])
        assert sent
    finally:
        await coord.stop()
        await store.close()
