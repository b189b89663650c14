"""What every source hands the pipeline: readings plus an optional acknowledgement."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

import msgspec

from pymigrate.types import Reading


class SourceBatch(msgspec.Struct):
    """Readings from one source event. ``ack`` (if any) is called once they are accepted
    (committed in the buffer) or definitively rejected; ``rejects`` are (reason, detail)
    pairs found while parsing, counted by the validator.

    ``local_clock`` says the timestamps were read from this gateway's own clock, so the
    time-sync model applies to them. Timestamps that came with the data (a replayed file,
    a sensor payload with its own ``ts``) are kept as given: the gateway's clock model
    says nothing about them.

    ``sampled`` marks a live sample of a sensor polled on a schedule: when the disk is
    full it is dropped (counted, reason ``disk_full``) instead of held, since holding it
    would only make newer samples wait behind it. Other batches are held (backpressure).
    """

    readings: list[Reading]
    ack: Callable[[], Awaitable[None]] | None = None
    rejects: list[tuple[str, str]] = msgspec.field(default_factory=list)
    local_clock: bool = True
    # identity of the source message when its readings were stamped on arrival (a
    # redelivery would otherwise look new to the edge dedup): fingerprints derive from it
    msg_key: int | None = None
    sampled: bool = False


class Emit(Protocol):
    async def __call__(self, batch: SourceBatch) -> None: ...


class Source(Protocol):
    """A long-running producer: ``run(emit)`` until cancelled or exhausted."""

    name: str

    async def run(self, emit: Emit) -> None: ...
