"""Fleet test helpers: a virtual clock that waits for the coordinator's real I/O."""

from __future__ import annotations

import asyncio

from cloud.fleet.coordinator import Coordinator
from pymigrate.clock import VirtualClock


class CoordinatorClock(VirtualClock):
    """Virtual time that does not move on while the coordinator commits or sends.

    A notification leaves only after its commit (real I/O in a thread for SQLite or over a
    socket for PostgreSQL); without this, virtual time would race past device timeouts
    while a commit is still on its way."""

    def __init__(self) -> None:
        super().__init__()
        self.coordinators: list[Coordinator] = []

    async def settle(self, rounds: int = 5) -> None:
        await super().settle(rounds)
        for _ in range(20_000):  # bounded: 10 s of real time at most
            if not any(c.busy for c in self.coordinators):
                return
            await asyncio.sleep(0.0005)
            await super().settle(rounds)
