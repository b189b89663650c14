"""Per-device ACLs on a TLS broker the test starts: a device can publish only its own
uplink topic.

Mosquitto with ``require_certificate true``, ``use_identity_as_username true`` (the
certificate CN is the username) and an ``acl_file`` whose patterns bind
``<prefix>/up/%u`` and ``<prefix>/ack/%u`` to that identity; the ingest's certificate may
read every uplink topic and write acks. Device A holding a valid certificate cannot get a
batch into device B's stream: the broker drops the publish, the ingest never sees it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from cloud.ingest import IngestService
from pymigrate.errors import PyMigrateError
from tests.conftest import require_binary
from tests.integration.transport_support import RecordingStore, make_batch
from tests.support.pki import make_ca, make_leaf, tls_mosquitto
from transports.config import MqttConfig
from transports.mqtt import MqttIngestServer, MqttUplink

pytestmark = pytest.mark.integration

PREFIX = f"acl/{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    require_binary("openssl")
    d = tmp_path_factory.mktemp("acl-pki")
    make_ca(d, "ca")
    make_leaf(d, "ca", "server", "127.0.0.1", san="IP:127.0.0.1")
    make_leaf(d, "ca", "dev-a", "sec-dev-a")
    make_leaf(d, "ca", "dev-b", "sec-dev-b")
    make_leaf(d, "ca", "ingest", "ingest-1")
    yield d


@pytest.fixture
async def acl_broker(pki: Path, tmp_path: Path) -> AsyncIterator[int]:
    acl = tmp_path / "acl"
    acl.write_text(f"""
user ingest-1
topic read {PREFIX}/up/+
topic write {PREFIX}/ack/+

pattern write {PREFIX}/up/%u
pattern read {PREFIX}/ack/%u
""")
    async with tls_mosquitto(pki, tmp_path, extra=f"acl_file {acl}") as port:
        yield port


def _cfg(pki: Path, port: int, cert: str) -> MqttConfig:
    return MqttConfig(port=port, prefix=PREFIX, ca_file=str(pki / "ca.crt"),
                      cert_file=str(pki / f"{cert}.crt"), key_file=str(pki / f"{cert}.key"),
                      connect_timeout_s=3.0, share_group=f"g{uuid.uuid4().hex[:6]}")


async def test_device_can_publish_only_its_own_topic(pki: Path, acl_broker: int,
                                                     tmp_path: Path) -> None:
    store = RecordingStore(tmp_path / "s.db")
    await store.open()
    service = IngestService(store)
    server = MqttIngestServer(_cfg(pki, acl_broker, "ingest"))
    await server.start(service.handle)
    try:
        # each device with its own certificate reaches the ingest
        for cert, dev in (("dev-a", "sec-dev-a"), ("dev-b", "sec-dev-b")):
            up = MqttUplink(_cfg(pki, acl_broker, cert), device_id=dev)
            bid, payload, seqs = make_batch(dev, 0)
            ack = await up.send(payload, batch_id=bid, timeout=5)
            await up.close()
            assert ack.status == "ok" and ack.accepted == len(seqs)
        before = dict(service.counters)

        # device A's certificate, device B's topic and a batch that says "sec-dev-b":
        # payload and topic agree, only the broker's ACL stands in the way
        impostor = MqttUplink(_cfg(pki, acl_broker, "dev-a"), device_id="sec-dev-b")
        bid, forged, _ = make_batch("sec-dev-b", 1)
        with pytest.raises(PyMigrateError):
            await impostor.send(forged, batch_id=bid, timeout=3)
        await impostor.close()
        await asyncio.sleep(0.5)
        assert service.counters["batches_received"] == before["batches_received"]
        assert await store.count("sec-dev-b") == 20  # only B's own first batch

        # and A's own stream still works after the refused attempt
        up = MqttUplink(_cfg(pki, acl_broker, "dev-a"), device_id="sec-dev-a")
        bid, payload, _ = make_batch("sec-dev-a", 1)
        assert (await up.send(payload, batch_id=bid, timeout=5)).status == "ok"
        await up.close()
        assert await store.count("sec-dev-a") == 40
    finally:
        await server.stop()
        await store.close()

