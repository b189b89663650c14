"""Test PKI with the openssl CLI and a private TLS Mosquitto started per test."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tests.conftest import free_port, require_binary, service_up


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_ca(d: Path, name: str) -> None:
    """A self-signed CA ``<name>.crt`` / ``<name>.key`` (CN = name)."""
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", f"{name}.key", "-out", f"{name}.crt", "-subj", f"/CN={name}", cwd=d)


def make_leaf(d: Path, ca: str, name: str, cn: str, san: str = "") -> None:
    """``<name>.crt`` / ``<name>.key`` signed by CA ``ca`` (CN = cn, optional SAN)."""
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
    extra: list[str] = []
    if san:
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        extra = ["-extfile", f"{name}.ext"]
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", *extra, cwd=d)


@asynccontextmanager
async def tls_mosquitto(pki: Path, tmp_path: Path, extra: str = "") -> AsyncIterator[int]:
    """A Mosquitto on a free loopback port requiring client certificates signed by
    ``pki/ca.crt`` (identity = certificate CN); yields the port, kills it after."""
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
{extra}
""")
    proc = await asyncio.create_subprocess_exec(binary, "-c", str(conf),
                                                stdout=subprocess.DEVNULL,
                                                stderr=subprocess.PIPE)
    try:
        for _ in range(100):  # wait for the listener (bounded: 5 s)
            if service_up("127.0.0.1", port, timeout=0.2) or proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
        if proc.returncode is not None or not service_up("127.0.0.1", port, timeout=0.2):
            err = await proc.stderr.read() if proc.stderr else b""
            pytest.fail(f"TLS mosquitto did not start: {err.decode(errors='replace')}")
        yield port
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
