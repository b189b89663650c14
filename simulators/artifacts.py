"""A firmware artifact server on loopback (aiohttp): serves images with ``Range`` support
and can drop the connection halfway through the first full download, so a device must
resume. Used by the ``fleet-firmware`` scenario and the firmware tests."""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

#: the shipped two-slot hook script (install / health / rollback), in the source tree
AB_HOOK = Path(__file__).resolve().parents[1] / "configs" / "fleet" / "firmware" / "ab-slot.sh"


@dataclass
class ArtifactServer:
    """Serves ``files`` (path -> bytes); ``drop_once`` cuts the first full GET after half
    the bytes (Content-Length promised the whole file). ``ranges`` logs each request's
    ``Range`` header ("" for a full GET)."""

    files: dict[str, bytes]
    drop_once: bool = False
    ranges: list[str] = field(default_factory=list)
    base: str = ""
    _runner: web.AppRunner | None = None

    def url(self, path: str) -> str:
        """The URL of ``path`` (e.g. ``/fw.bin``)."""
        return self.base + path

    async def start(self) -> ArtifactServer:
        app = web.Application()
        app.router.add_get("/{name}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.base = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = self.files.get(request.path)
        if body is None:
            raise web.HTTPNotFound()
        rng = request.headers.get("Range", "")
        self.ranges.append(rng)
        m = re.fullmatch(r"bytes=(\d+)-", rng)
        start = int(m.group(1)) if m else 0
        resp = web.StreamResponse(status=206 if m else 200)
        resp.content_length = len(body) - start
        if m:
            resp.headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
        await resp.prepare(request)
        if self.drop_once and not m:
            self.drop_once = False
            await resp.write(body[: len(body) // 2])
            if request.transport is not None:
                request.transport.close()  # the link dies mid-body
            return resp
        await resp.write(body[start:])
        await resp.write_eof()
        return resp
