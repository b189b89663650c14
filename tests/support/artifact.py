"""Test helpers for firmware jobs: an HTTP artifact server on loopback (aiohttp) with
Range support that can drop the connection halfway through the first full download."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import free_port

#: the shipped two-slot hook script (install / health / rollback)
HOOK = str(Path(__file__).resolve().parents[2] / "configs/fleet/firmware/ab-slot.sh")


@dataclass
class ArtifactServer:
    """Serves ``body`` at /fw.bin with Range; ``drop_once`` cuts the first full GET after
    half the bytes (Content-Length promised the whole file)."""

    body: bytes
    drop_once: bool = False
    ranges: list[str] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        rng = request.headers.get("Range", "")
        self.ranges.append(rng)
        m = re.fullmatch(r"bytes=(\d+)-", rng)
        start = int(m.group(1)) if m else 0
        resp = web.StreamResponse(status=206 if m else 200)
        resp.content_length = len(self.body) - start
        if m:
            resp.headers["Content-Range"] = f"bytes {start}-{len(self.body) - 1}/{len(self.body)}"
        await resp.prepare(request)
        if self.drop_once and not m:
            self.drop_once = False
            await resp.write(self.body[: len(self.body) // 2])
            assert request.transport is not None
            request.transport.close()  # the link dies mid-body
            return resp
        await resp.write(self.body[start:])
        await resp.write_eof()
        return resp


@pytest.fixture
async def server() -> AsyncIterator[Callable[..., Awaitable[ArtifactServer]]]:
    runners: list[web.AppRunner] = []

    async def start(body: bytes, **kw: Any) -> ArtifactServer:
        srv = ArtifactServer(body, **kw)
        app = web.Application()
        app.router.add_get("/fw.bin", srv.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        srv.url = f"http://127.0.0.1:{port}/fw.bin"
        return srv

    yield start
    for r in runners:
        await r.cleanup()
