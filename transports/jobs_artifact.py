"""Artifact download for firmware jobs: HTTP(S) GET that resumes with ``Range``.

Used by ``agent.firmware``; aiohttp stays behind this module (its errors become
:class:`~pymigrate.errors.TransportError`). One call is one attempt: it appends to the
partial file ``dest`` from where it stopped (``Range: bytes=<have>-``; a ``206`` answer
is appended, a ``200`` restarts the file), never writes past ``size`` and fsyncs what it
wrote, so a dropped connection, a crash or a power cut keeps the bytes already on disk
and the next attempt asks only for the rest.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import BinaryIO

import aiohttp

from pymigrate.errors import PyMigrateError, TransportError

OnBytes = Callable[[int], Awaitable[None]]


# Local file steps are small (a stat, one 64 KiB write): done inline, not in a thread.
def _partial_size(dest: Path, size: int) -> int:
    have = dest.stat().st_size if dest.exists() else 0
    if have > size:  # stale partial of something else: start over
        dest.unlink(missing_ok=True)
        return 0
    return have


def _open(dest: Path, append: bool) -> BinaryIO:
    return open(dest, "ab" if append else "wb")  # closed by the caller's with-block


class ArtifactError(PyMigrateError):
    """The server's answer can never become the artifact (size, status): not retriable."""

    reason = "artifact"


async def fetch_range(url: str, dest: Path, *, size: int, on_bytes: OnBytes,
                      ssl_ctx: ssl.SSLContext | None = None, timeout_s: float = 60.0,
                      chunk_bytes: int = 64 * 1024) -> int:
    """Fetch the rest of ``url`` into ``dest`` (``size`` bytes in all); return the bytes
    now in ``dest``. :class:`TransportError` (retriable) on a broken connection or a
    5xx; :class:`ArtifactError` when the server sends more than ``size`` bytes or
    answers 4xx."""
    have = _partial_size(dest, size)
    if have == size:
        return have
    headers = {"Range": f"bytes={have}-"} if have else {}
    timeout = aiohttp.ClientTimeout(sock_connect=timeout_s, sock_read=timeout_s)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session, \
                session.get(url, headers=headers, ssl=ssl_ctx if ssl_ctx else True) as resp:
            if resp.status == 206 and have:
                if not resp.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
                    raise ArtifactError(f"{url}: Content-Range "
                                        f"{resp.headers.get('Content-Range')!r} does not "
                                        f"start at byte {have}", reason="bad_range")
                append = True
            elif resp.status == 200:
                have, append = 0, False  # the server ignored Range: take the whole file
            elif resp.status == 416:
                _partial_size(dest, -1)  # drop the partial
                raise TransportError(f"{url}: range {have}- not satisfiable",
                                     reason="http_416")
            elif resp.status >= 500:
                raise TransportError(f"{url}: HTTP {resp.status}",
                                     reason=f"http_{resp.status}")
            else:
                raise ArtifactError(f"{url}: HTTP {resp.status}", reason=f"http_{resp.status}")
            with _open(dest, append) as f:
                try:
                    async for block in resp.content.iter_chunked(chunk_bytes):
                        if have + len(block) > size:
                            raise ArtifactError(f"{url}: more than the announced {size} bytes",
                                                reason="size_mismatch")
                        f.write(block)
                        have += len(block)
                        await on_bytes(have)
                finally:  # keep what arrived: the next attempt resumes after it
                    f.flush()
                    os.fsync(f.fileno())
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise TransportError(f"download of {url} broke at byte {have}: {exc!r}",
                             reason="download_broken") from exc
    return have
