"""CoAP interoperability with an independent implementation (libcoap's coap-client/server).

- libcoap's ``coap-client`` posts an envelope file block-wise (Block1, 256-byte blocks) to
  our :class:`CoapIngestServer` and gets 2.04 with the ingest's Ack;
- our :class:`CoapUplink` posts a multi-block batch to libcoap's ``coap-server``, which
  reassembles it (read back with ``coap-client`` GET, byte for byte); as that peer is no
  PyMigrate ingest, its 2.01 without an Ack is a TransportError, never a silent success.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cloud.ingest import IngestService
from pymigrate.envelope import decode_ack
from pymigrate.errors import ThrottledError, TransportError
from tests.conftest import free_port, require_binary
from tests.integration import transport_support
from tests.integration.transport_support import RecordingStore, make_batch
from transports.coap import CoapIngestServer, CoapUplink

pytestmark = pytest.mark.integration
fresh_structlog = transport_support.fresh_structlog  # autouse: see its docstring


def _libcoap(tool: str) -> str:
    """``coap-client``/``coap-server``, or the Debian variant names (-notls, -openssl)."""
    for name in (tool, f"{tool}-notls", f"{tool}-openssl", f"{tool}-gnutls"):
        path = shutil.which(name)
        if path:
            return path
    return require_binary(tool)


async def _run(*args: str, timeout: float = 20.0) -> tuple[int, bytes, bytes]:  # noqa: ASYNC109
    proc = await asyncio.create_subprocess_exec(*args, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode or 0, out, err


@pytest.fixture
async def ingest(tmp_path: Path) -> AsyncIterator[tuple[int, RecordingStore, IngestService]]:
    store = RecordingStore(tmp_path / "store.db")
    await store.open()
    service = IngestService(store)
    port = free_port(socket.SOCK_DGRAM)
    server = CoapIngestServer("127.0.0.1", port)
    await server.start(service.handle)
    try:
        yield port, store, service
    finally:
        await server.stop()
        await store.close()


async def test_libcoap_client_posts_blockwise_to_our_ingest(
        ingest: tuple[int, RecordingStore, IngestService], tmp_path: Path) -> None:
    client = _libcoap("coap-client")
    port, store, service = ingest
    device = f"lc{uuid.uuid4().hex[:8]}"
    batch_id, payload, seqs = make_batch(device, 0, per_batch=600)
    assert len(payload) > 1024  # several 256-byte blocks
    path = tmp_path / "batch.bin"
    path.write_bytes(payload)
    uri = f"coap://127.0.0.1:{port}/ingest/{device}"
    rc, out, err = await _run(client, "-m", "post", "-b", "256", "-f", str(path), uri)
    assert rc == 0, err
    ack = decode_ack(out.strip())
    assert (ack.batch_id, ack.status, ack.accepted) == (batch_id, "ok", len(seqs))
    assert await store.count(device) == len(seqs)
    # again: idempotent, answered as a duplicate
    rc, out, err = await _run(client, "-m", "post", "-b", "256", "-f", str(path), uri)
    assert decode_ack(out.strip()).status == "duplicate"
    # another device's path: the channel identity does not match the envelope -> 4.00
    rc, out, err = await _run(client, "-m", "post", "-b", "256", "-f", str(path),
                              f"coap://127.0.0.1:{port}/ingest/someone-else")
    assert b"4.00" in err + out
    # garbage -> 4.00 with a reason, counted, nothing written
    path.write_bytes(b"not an envelope" * 10)
    rc, out, err = await _run(client, "-m", "post", "-f", str(path), uri)
    assert b"4.00" in err + out
    assert service.counters["rejected:device_mismatch"] == 1
    assert await store.count(device) == len(seqs)


async def test_our_ingest_throttles_with_503_max_age(
        ingest: tuple[int, RecordingStore, IngestService]) -> None:
    port, store, service = ingest

    class Limiter:
        def check(self, device_id: str) -> None:
            raise ThrottledError(retry_after_s=2.2)

    service.limiter = Limiter()
    device = f"th{uuid.uuid4().hex[:8]}"
    up = CoapUplink(f"coap://127.0.0.1:{port}/ingest", device_id=device)
    batch_id, payload, _ = make_batch(device, 0)
    with pytest.raises(ThrottledError) as ei:
        await up.send(payload, batch_id=batch_id, timeout=5)
    await up.close()
    assert ei.value.retry_after_s == 3.0  # Max-Age rounds up: never invites an early retry
    assert await store.count(device) == 0


async def test_our_uplink_blockwise_to_libcoap_server(tmp_path: Path) -> None:
    server_bin = _libcoap("coap-server")
    client = _libcoap("coap-client")
    port = free_port(socket.SOCK_DGRAM)
    proc = await asyncio.create_subprocess_exec(
        server_bin, "-A", "127.0.0.1", "-p", str(port), "-d", "4",
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        device = f"ls{uuid.uuid4().hex[:8]}"
        batch_id, payload, _ = make_batch(device, 0, per_batch=800)
        assert len(payload) > 4 * 1024
        up = CoapUplink(f"coap://127.0.0.1:{port}/ingest", device_id=device,
                        ack_timeout_s=0.5)
        for _ in range(20):  # the server needs a moment to bind
            try:
                await up.send(payload, batch_id=batch_id, timeout=3)
            except TransportError as exc:
                if "no valid ack" in str(exc) or "answered" in str(exc):
                    break
                await asyncio.sleep(0.1)
        else:
            pytest.fail("coap-server never answered")
        await up.close()
        out_file = tmp_path / "back.bin"
        rc, _, err = await _run(client, "-m", "get", "-b", "512", "-o", str(out_file),
                                f"coap://127.0.0.1:{port}/ingest/{device}")
        assert rc == 0, err
        assert out_file.read_bytes() == payload
    finally:
        proc.terminate()
        await proc.wait()
