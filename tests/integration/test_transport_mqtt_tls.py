"""MQTT over TLS with client certificates, against a Mosquitto the test starts itself.

The test makes a CA, a server certificate (SAN IP:127.0.0.1), device and ingest client
certificates, and a second, rogue CA with its own "device" certificate (``openssl`` CLI).
The broker has ``require_certificate true`` and ``use_identity_as_username true``.

A device with a certificate from the wrong CA, or with none, is refused: the uplink raises
:class:`TransportError` (retriable: the broker's refusal looks like a dropped link to the
client; the uploader's circuit breaker stops hammering it). A device that does not trust
the broker's certificate fails verification locally: TransportError with
``retriable=False`` and ``reason="tls"`` (no retry can fix a trust problem).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import pytest

from cloud.ingest import IngestService
from pymigrate.errors import TransportError
from tests.conftest import free_port, require_binary, service_up
from tests.integration import transport_support
from tests.integration.transport_support import RecordingStore, make_batch
from transports.config import MqttConfig
from transports.mqtt import MqttIngestServer, MqttUplink

pytestmark = pytest.mark.integration
fresh_structlog = transport_support.fresh_structlog  # autouse: see its docstring


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-keyout", f"{name}.key", "-out", f"{name}.crt", "-subj", f"/CN={name}", cwd=d)


def _leaf(d: Path, ca: str, name: str, cn: str, san: str = "") -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
    extra: list[str] = []
    if san:
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        extra = ["-extfile", f"{name}.ext"]
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", *extra, cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    require_binary("openssl")
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "rogue-ca")
    _leaf(d, "ca", "server", "127.0.0.1", san="IP:127.0.0.1")
    _leaf(d, "ca", "device", "tls-device-1")
    _leaf(d, "ca", "ingest", "ingest-1")
    _leaf(d, "rogue-ca", "rogue", "tls-device-1")
    yield d


@pytest.fixture
async def tls_broker(pki: Path, tmp_path: Path) -> AsyncIterator[int]:
    # Debian installs the broker in /usr/sbin, which is not on every PATH
    binary = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK)
        else require_binary("mosquitto"))
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"""
user root
persistence false
set_tcp_nodelay true
listener {port} 127.0.0.1
cafile {pki / 'ca.crt'}
certfile {pki / 'server.crt'}
keyfile {pki / 'server.key'}
require_certificate true
use_identity_as_username true
allow_anonymous false
""")
    proc = await asyncio.create_subprocess_exec(binary, "-c", str(conf),
                                                stdout=subprocess.DEVNULL,
                                                stderr=subprocess.PIPE)
    try:
        for _ in range(100):  # wait for the listener (bounded: 5 s)
            if service_up("127.0.0.1", port, timeout=0.2):
                break
            if proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("TLS mosquitto did not start")
        if proc.returncode is not None:
            err = await proc.stderr.read() if proc.stderr else b""
            pytest.fail(f"mosquitto exited: {err.decode(errors='replace')}")
        yield port
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


def _cfg(pki: Path, port: int, cert: str, ca: str = "ca") -> MqttConfig:
    return MqttConfig(port=port, prefix=f"tls/{uuid.uuid4().hex[:8]}",
                      ca_file=str(pki / f"{ca}.crt"), cert_file=str(pki / f"{cert}.crt"),
                      key_file=str(pki / f"{cert}.key"), connect_timeout_s=3.0)


async def test_tls_client_certificates(pki: Path, tls_broker: int, tmp_path: Path) -> None:
    store = RecordingStore(tmp_path / "s.db")
    await store.open()
    ingest_cfg = _cfg(pki, tls_broker, "ingest")
    device_cfg = msgspec.structs.replace(ingest_cfg, cert_file=str(pki / "device.crt"),
                                         key_file=str(pki / "device.key"))
    server = MqttIngestServer(ingest_cfg)
    await server.start(IngestService(store).handle)
    try:
        up = MqttUplink(device_cfg, device_id="tls-device-1")
        batch_id, payload, seqs = make_batch("tls-device-1", 0)
        ack = await up.send(payload, batch_id=batch_id, timeout=5)
        await up.close()
        assert ack.status == "ok" and ack.accepted == len(seqs)
        assert await store.count("tls-device-1") == len(seqs)

        # a certificate from another CA is refused by the broker
        rogue = MqttUplink(msgspec.structs.replace(
            device_cfg, cert_file=str(pki / "rogue.crt"), key_file=str(pki / "rogue.key")),
            device_id="tls-device-1")
        batch_id, payload, _ = make_batch("tls-device-1", 1)
        with pytest.raises(TransportError) as ei:
            await rogue.send(payload, batch_id=batch_id, timeout=3)
        print("rogue:", ei.value, ei.value.retriable)
        await rogue.close()

        # no client certificate at all: refused too
        anon = MqttUplink(msgspec.structs.replace(device_cfg, cert_file="", key_file=""),
                          device_id="tls-device-1")
        with pytest.raises(TransportError) as ei:
            await anon.send(payload, batch_id=batch_id, timeout=3)
        print("anon:", ei.value, ei.value.retriable)
        await anon.close()
        assert await store.count("tls-device-1") == len(seqs)  # nothing else got in
    finally:
        await server.stop()
        await store.close()


async def test_tls_untrusted_broker_is_not_retriable(pki: Path, tls_broker: int) -> None:
    cfg = _cfg(pki, tls_broker, "device", ca="rogue-ca")  # trusts the wrong CA
    up = MqttUplink(cfg, device_id="tls-device-1")
    with pytest.raises(TransportError) as ei:
        await up.connect()
    await up.close()
    assert ei.value.retriable is False and ei.value.reason == "tls"
