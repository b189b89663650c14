"""The ingest stage: source batches -> dedup -> time correction -> validation -> priority
-> aggregation -> durable buffer, then acknowledge the source.

It is one task consuming one bounded queue: a full queue slows the sources (backpressure).
It sleeps on the queue or on the aggregator's next window deadline, never on a tick.

When the buffer cannot store (a full disk), a batch is held and retried (its source stays
un-acknowledged: an MQTT QoS 1 message is redelivered, a replay pauses behind the full
queue), except a live sample (``SourceBatch.sampled``), which is dropped and counted
(``dropped_disk_full``). Once a stop is requested, held batches are given up un-acked
(counted as ``not_accepted_at_stop``) so the stop finishes within its deadline.
"""

from __future__ import annotations

import asyncio
import collections
import fnmatch
from array import array
from collections.abc import Sequence
from typing import Any

import structlog

from agent.aggregate import Aggregator
from agent.buffer import DurableBuffer
from agent.clockjournal import ClockJournal
from agent.config import SensorPriority
from agent.dedup import Deduplicator
from agent.sources.base import SourceBatch
from agent.timesync import TimeCorrector
from agent.validate import Validator
from pymigrate.clock import Clock
from pymigrate.errors import BufferFull
from pymigrate.types import Priority, Reading

log = structlog.get_logger("pymigrate.agent.pipeline")

AGG_STATE_KEY = "aggregation"
_STOP = object()


class PriorityMap:
    """Sensor-name globs -> priority; first match wins; a source's own priority is kept
    when it is more important than the rule's."""

    def __init__(self, rules: Sequence[SensorPriority]) -> None:
        self.rules = [(r.match, Priority.parse(r.priority)) for r in rules]
        self._cache: dict[str, Priority | None] = {}

    def lookup(self, sensor: str) -> Priority | None:
        if sensor not in self._cache:
            hit = next((p for pat, p in self.rules if fnmatch.fnmatchcase(sensor, pat)), None)
            if len(self._cache) < 100_000:
                self._cache[sensor] = hit
            return hit
        return self._cache[sensor]

    def apply(self, readings: list[Reading]) -> list[Reading]:
        if not self.rules:
            return readings
        out = []
        for r in readings:
            p = self.lookup(r.sensor)
            if p is not None and p < r.priority:
                r = Reading(r.device_id, r.sensor, r.ts_ms, r.value, p, r.seq, r.raw_ts_ms,
                            r.quality, r.uncert_ms, r.agg)
            out.append(r)
        return out


class IngestStage:
    """Consumes SourceBatches from ``queue`` until it gets the stop sentinel."""

    def __init__(self, queue: asyncio.Queue[Any], *, buffer: DurableBuffer, clock: Clock,
                 validator: Validator, dedup: Deduplicator, timesync: TimeCorrector,
                 aggregator: Aggregator, priorities: PriorityMap,
                 max_pending: int = 256, clockjournal: ClockJournal | None = None) -> None:
        self.queue = queue
        self.buffer = buffer
        self.clock = clock
        self.validator = validator
        self.dedup = dedup
        self.timesync = timesync
        self.clockjournal = clockjournal
        self.aggregator = aggregator
        self.priorities = priorities
        self.counts: collections.Counter[str] = collections.Counter()
        self._has_rules = bool(aggregator.config.rules)
        self._tg: asyncio.TaskGroup | None = None
        self._slots = asyncio.Semaphore(max_pending)
        self._stopping = asyncio.Event()

    async def restore(self) -> None:
        """Restore persisted state: the edge-dedup fingerprints of what sources may
        deliver again, the aggregation windows (forwarding what they hand back)."""
        self.buffer.dedup_keep_ms = int(self.dedup.config.window_s * 1000)
        self.buffer.dedup_keep_bytes = min(self.buffer.dedup_keep_bytes,
                                           8 * self.dedup.config.max_entries)
        now = self.clock.time_ms()
        restored = self.dedup.restore(
            (fp, (now - seen) / 1000.0)
            for seen, blob in await self.buffer.recent_dedup()
            for fp in array("Q", blob[: len(blob) - len(blob) % 8]))
        if restored:
            log.info("dedup window restored", fingerprints=restored)
        if not self._has_rules:
            return
        blob = await self.buffer.get_state(AGG_STATE_KEY)
        if blob:
            out = self.aggregator.restore(blob)
            if out:
                await self._store(out)

    async def stop(self) -> None:
        self._stopping.set()  # batches held on a full buffer give up (un-acked)
        await self.queue.put(_STOP)

    async def run(self) -> None:
        # Appends run as tasks so that many source batches share one group commit; they
        # are started in arrival order, and the buffer assigns sequence numbers in call
        # order, so acceptance order is arrival order. The semaphore bounds them.
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            while True:
                item = await self._next()
                if item is _STOP:
                    break
                if item is None:  # a window deadline passed
                    closed = self.aggregator.advance()
                    if closed:
                        await self._spawn(closed, None)
                    continue
                await self.process(item)
        self._tg = None
        # graceful stop: persist open windows (not flushed: a restart continues them)
        await self._persist_windows()

    async def _next(self) -> Any:
        deadline = self.aggregator.next_deadline_ms() if self._has_rules else None
        if deadline is None:
            return await self.queue.get()
        delay = max(0.0, (deadline - self.clock.time_ms()) / 1000.0)
        if not self.queue.empty():
            return self.queue.get_nowait()
        getter = asyncio.ensure_future(self.queue.get())
        sleeper = asyncio.ensure_future(self.clock.sleep(delay))
        try:
            done, _ = await asyncio.wait({getter, sleeper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            if not getter.done():
                getter.cancel()
        if getter in done and not getter.cancelled():
            return getter.result()
        return None

    async def process(self, batch: SourceBatch) -> None:
        """Run one source batch through the stages and hand it to the buffer."""
        for reason, detail in batch.rejects:
            self.validator.reject(reason, detail=detail)
        readings = batch.readings
        self.counts["received"] += len(readings)
        out: list[Reading] = []
        # what a source can deliver again (un-acked QoS 1, a replayed file) keeps its
        # dedup fingerprints in the buffer, in the transaction of its readings
        admitted: list[int] | None = (
            [] if batch.ack is not None or not batch.local_clock else None)
        if readings:
            fresh = (self.dedup.filter(readings, admitted) if batch.msg_key is None
                     else self.dedup.filter_keyed(readings, batch.msg_key, admitted))
            self.counts["duplicates_dropped"] += len(readings) - len(fresh)
            corrected = self.timesync.correct(fresh) if batch.local_clock else fresh
            if self.clockjournal is not None and batch.local_clock:
                self.clockjournal.note_stamped(corrected)
            valid = self.validator.filter(corrected)
            prioritized = self.priorities.apply(valid)
            out = self.aggregator.process(prioritized) if self._has_rules else prioritized
        await self._spawn(out, batch.ack, array("Q", admitted).tobytes() if admitted else b"",
                          batch.sampled)

    async def _spawn(self, readings: list[Reading], ack: Any, dedup: bytes = b"",
                     sampled: bool = False) -> None:
        # the window state is snapshotted now, in processing order, so the blob written
        # with this batch reflects exactly the readings processed up to it
        snap = self.aggregator.snapshot() if self._has_rules else None
        if self._tg is None:  # called outside run(): do it inline
            await self._accept(readings, ack, snap, dedup, sampled)
            return
        await self._slots.acquire()
        self._tg.create_task(self._accept(readings, ack, snap, dedup, sampled),
                             name="agent[ingest-append]")

    async def _accept(self, readings: list[Reading], ack: Any, snap: bytes | None,
                      dedup: bytes = b"", sampled: bool = False) -> None:
        try:
            state = None if snap is None else (AGG_STATE_KEY, snap)
            if readings:
                # the window state goes into the same transaction as the readings
                if not await self._store(readings, state, dedup, sampled=sampled):
                    return  # not accepted: the source is not acknowledged
            elif state is not None or dedup:
                await self.buffer.append([], state=state, dedup=dedup)
            if ack is not None:
                await ack()  # only now: the readings are committed (or were invalid)
        finally:
            if self._tg is not None:
                self._slots.release()

    async def _store(self, readings: list[Reading], state: tuple[str, bytes] | None = None,
                     dedup: bytes = b"", *, sampled: bool = False) -> bool:
        """Append to the buffer, holding on BufferFull; True once accepted."""
        delay = 0.25
        while True:
            try:
                accepted = await self.buffer.append(readings, state=state, dedup=dedup)
                break
            except BufferFull as exc:
                if sampled and exc.reason == "disk_full":
                    self.counts["dropped_disk_full"] += len(readings)
                    if self.counts["dropped_disk_full"] == len(readings) or \
                            self.counts["buffer_full_waits"] % 100 == 0:
                        log.warning("ingest.sample_dropped", reason="disk_full",
                                    count=len(readings),
                                    total=self.counts["dropped_disk_full"])
                    self.counts["buffer_full_waits"] += 1
                    return False
                if self._stopping.is_set():
                    self.counts["not_accepted_at_stop"] += len(readings)
                    log.warning("ingest.not_accepted_at_stop", reason=exc.reason,
                                count=len(readings))
                    return False
                # nothing accepted yet: hold the batch (the source stays un-acked and
                # backpressured) and retry once eviction or the uploader freed space
                self.counts["buffer_full_waits"] += 1
                if self.counts["buffer_full_waits"] % 100 == 1:  # loud, not a flood
                    log.warning("ingest.holding", reason=exc.reason, count=len(readings),
                                waits=self.counts["buffer_full_waits"], retry_in_s=delay)
                await self._sleep_unless_stopping(delay)
                delay = min(delay * 2, 5.0)
        self.counts["accepted"] += len(accepted)
        if self.clockjournal is not None:
            self.clockjournal.note_stored(accepted)
        return True

    async def _sleep_unless_stopping(self, delay: float) -> None:
        sleeper = asyncio.ensure_future(self.clock.sleep(delay))
        stopper = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (sleeper, stopper):
                t.cancel()
            await asyncio.gather(sleeper, stopper, return_exceptions=True)

    async def _persist_windows(self) -> None:
        if self._has_rules:
            await self.buffer.put_state(AGG_STATE_KEY, self.aggregator.snapshot())
