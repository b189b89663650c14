"""What every coordinator service (built-in MQTT, AWS IoT Jobs) does when it can no longer
act: the first error of one of its named tasks, or a lost lease, is latched in
:attr:`Supervised.error` and sets :attr:`Supervised.failed`; ``pymigrate fleet serve``
waits on that event and exits non-zero (3 for a lost lease)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any

import structlog

from cloud.fleet.store import LeaseLost

log = structlog.get_logger("pymigrate.fleet")


class Supervised:
    """Failure latch of a coordinator service (mixin)."""

    token: int
    #: set when a task died or the lease was lost; ``error`` says why
    failed: asyncio.Event
    error: BaseException | None

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.failed.set()

    def _lease_lost(self) -> None:
        self._fail(LeaseLost("the lease session ended", token=self.token))

    def _task_died(self, task: asyncio.Task[Any]) -> None:
        """Done callback of a service task: an exception fails the service."""
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("fleet task died", task=task.get_name(), error=repr(exc))
            self._fail(exc)


async def cancel_all(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait until each has ended (their errors were already seen by
    :meth:`Supervised._task_died`)."""
    tasks = list(tasks)
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await t
