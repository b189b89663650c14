"""The fleet job channel on a TLS broker with per-identity ACLs (the test starts it):
``pymigrate fleet serve`` and the devices' jobs clients connect with client certificates,
a signed rollout completes, and a device cannot speak for another device, forge a job for
it, or send control commands.

Identities are certificate CNs (``use_identity_as_username``): the coordinator may read
every device's start/update/result topic and write every notify topic and read the
control topic; the operator may write the control topic; a device only its own topics.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from agent.jobs import JobsClient
from cloud.fleet.cli import build_parser, serve
from cloud.fleet.coordinator import Coordinator, control_document
from cloud.fleet.protocol import Health, JobDocument, JobNotify, JobResult, encode
from cloud.fleet.spec import Gate, RolloutSpec, WavePlan
from pymigrate.clock import WallClock
from tests.conftest import require_binary
from tests.support.pki import make_ca, make_leaf, tls_mosquitto
from transports.jobs_mqtt import MqttDeviceHub, control_topic, publish_once, tls_context, topic
from transports.jobs_security import generate_keypair, load_private_key, load_public_key

pytestmark = pytest.mark.integration
PREFIX = f"fleetacl/{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    require_binary("openssl")
    d = tmp_path_factory.mktemp("fleet-pki")
    make_ca(d, "ca")
    make_leaf(d, "ca", "server", "127.0.0.1", san="IP:127.0.0.1")
    for name in ("coordinator", "operator", "dev-a", "dev-b"):
        make_leaf(d, "ca", name, f"fl-{name}")
    yield d


@pytest.fixture
async def broker(pki: Path, tmp_path: Path) -> AsyncIterator[int]:
    acl = tmp_path / "acl"
    acl.write_text(f"""
user fl-coordinator
topic read {PREFIX}/jobs/+/start
topic read {PREFIX}/jobs/+/update
topic read {PREFIX}/jobs/+/result
topic write {PREFIX}/jobs/+/notify
topic read {PREFIX}/fleet/control

user fl-operator
topic write {PREFIX}/fleet/control

pattern read {PREFIX}/jobs/%u/notify
pattern write {PREFIX}/jobs/%u/start
pattern write {PREFIX}/jobs/%u/update
pattern write {PREFIX}/jobs/%u/result
""")
    async with tls_mosquitto(pki, tmp_path, extra=f"acl_file {acl}") as port:
        yield port


def _tls(pki: Path, name: str) -> list[str]:
    return ["--ca-file", str(pki / "ca.crt"), "--cert-file", str(pki / f"{name}.crt"),
            "--key-file", str(pki / f"{name}.key")]


async def test_tls_channel_signed_rollout_and_acls(pki: Path, broker: int,
                                                   tmp_path: Path) -> None:
    job_key, job_pub = generate_keypair(tmp_path, "jobs")
    op_key, op_pub = generate_keypair(tmp_path, "operator")
    db = str(tmp_path / "fleet.db")
    args = build_parser().parse_args([
        "serve", "--store", db, "--broker", f"127.0.0.1:{broker}", "--prefix", PREFIX,
        "--signing-key", str(job_key), "--control-key", str(op_pub), *_tls(pki, "coordinator")])
    stop = asyncio.Event()
    started: asyncio.Future[Coordinator] = asyncio.get_running_loop().create_future()
    server = asyncio.create_task(serve(args, stop, started), name="test[serve-tls]")
    coord = await asyncio.wait_for(started, 10)
    devs = {"fl-dev-a": "dev-a", "fl-dev-b": "dev-b"}
    await coord.add_devices([(d, {}) for d in devs])
    hubs, clients = [], []
    for dev, cert in devs.items():
        hub = MqttDeviceHub("127.0.0.1", broker, prefix=PREFIX, client_id=f"{dev}-jobs",
                            tls=tls_context("jobs", str(pki / "ca.crt"),
                                            str(pki / f"{cert}.crt"), str(pki / f"{cert}.key")))
        await hub.start()
        cfg = tmp_path / f"{dev}.toml"
        cfg.write_text("v = 1\n")
        c = JobsClient(dev, channel=hub.link(dev), apply_config=lambda p: None,
                       health=lambda: Health(), clock=WallClock(), config_path=cfg,
                       check_delay_s=0.01, soak_reports=0, verify_key=load_public_key(job_pub))
        await c.start()
        hubs.append(hub)
        clients.append(c)
    try:
        r = await coord.create_rollout(RolloutSpec(
            "tls-1", document=JobDocument(content="v = 2\n"), plan=WavePlan(canary=2),
            gate=Gate(min_executed=2), soak_s=0.1, max_notifications_per_min=60000))
        await asyncio.wait_for(coord.wait_finished("tls-1"), 20)
        assert r.status == "completed"
        assert all(c.applied == 1 and c.untrusted == {} for c in clients)

        # device A (valid certificate) reports for device B: the broker drops it
        a_tls = tls_context("x", str(pki / "ca.crt"), str(pki / "dev-a.crt"),
                            str(pki / "dev-a.key"))
        refused, rejected = coord.refused, coord.rejected
        await publish_once("127.0.0.1", broker, topic(PREFIX, "fl-dev-b", "result"),
                           encode(JobResult("fl-dev-b", "tls-1", "failed")), tls=a_tls)
        # ... forges a job for device B (even signed by a key B does not trust)
        forged = JobNotify("evil", "fl-dev-b", "apply", 0, JobDocument(content="v = 9\n"))
        await publish_once("127.0.0.1", broker, topic(PREFIX, "fl-dev-b", "notify"),
                           encode(forged), tls=a_tls)
        # ... and tries to abort the rollout, even with a validly signed command
        body = control_document("abort", load_private_key(op_key), WallClock().time_ms(),
                                rollout_id="tls-1")
        await publish_once("127.0.0.1", broker, control_topic(PREFIX), body, tls=a_tls)
        await asyncio.sleep(0.5)
        assert (coord.refused, coord.rejected) == (refused, rejected)  # never arrived
        assert r.status == "completed" and r.counts[4] == 2
        assert (tmp_path / "fl-dev-b.toml").read_text() == "v = 2\n"
        assert clients[1].untrusted == {} and clients[1].applied == 1

        # the operator's certificate may publish control; unsigned is still refused
        op_tls = tls_context("x", str(pki / "ca.crt"), str(pki / "operator.crt"),
                             str(pki / "operator.key"))
        await publish_once("127.0.0.1", broker, control_topic(PREFIX),
                           b'{"cmd": "abort", "rollout_id": "tls-1"}', tls=op_tls)
        for _ in range(100):
            if coord.rejected > rejected:
                break
            await asyncio.sleep(0.02)
        assert coord.rejected == rejected + 1 and r.status == "completed"
    finally:
        for c in clients:
            await c.stop()
        for h in hubs:
            await h.stop()
        stop.set()
        assert await asyncio.wait_for(server, 10) == 0
