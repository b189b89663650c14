"""Test helpers for firmware jobs: the loopback artifact server of the simulators as a
fixture (``await server(body, drop_once=True)`` serves ``body`` at ``srv.url``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from simulators.artifacts import AB_HOOK, ArtifactServer

#: the shipped two-slot hook script (install / health / rollback)
HOOK = str(AB_HOOK)


@dataclass
class Served:
    """One served image: its URL and the server (``ranges`` logs requests)."""

    srv: ArtifactServer
    url: str

    @property
    def ranges(self) -> list[str]:
        return self.srv.ranges


@pytest.fixture
async def server() -> AsyncIterator[Callable[..., Awaitable[Served]]]:
    started: list[ArtifactServer] = []

    async def start(body: bytes, **kw: Any) -> Served:
        srv = await ArtifactServer({"/fw.bin": body}, **kw).start()
        started.append(srv)
        return Served(srv, srv.url("/fw.bin"))

    yield start
    for s in started:
        await s.stop()
