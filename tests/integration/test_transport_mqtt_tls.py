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

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import pytest

from cloud.ingest import IngestService
from pymigrate.errors import TransportError
from tests.conftest import require_binary
from tests.integration import transport_support
from tests.integration.transport_support import RecordingStore, make_batch
from transports.config import MqttConfig
from transports.mqtt import MqttIngestServer, MqttUplink

pytestmark = pytest.mark.integration
from tests.support.pki import make_ca, make_leaf, tls_mosquitto  # noqa: E402

fresh_structlog = transport_support.fresh_structlog  # autouse: see its docstring


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    require_binary("openssl")
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_ca(d, "rogue-ca")
    make_leaf(d, "ca", "server", "127.0.0.1", san="IP:127.0.0.1")
    make_leaf(d, "ca", "device", "tls-device-1")
    make_leaf(d, "ca", "ingest", "ingest-1")
    make_leaf(d, "rogue-ca", "rogue", "tls-device-1")
    yield d


@pytest.fixture
async def tls_broker(pki: Path, tmp_path: Path) -> AsyncIterator[int]:
    async with tls_mosquitto(pki, tmp_path) as port:
        yield port


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
