"""Cloud ingest: decode and verify a batch, write it idempotently, ack with server times.

Order of checks: size and envelope (magic, version, checksum) -> channel identity ->
every chunk's checksum and codec -> store write (one transaction) -> ack. A batch is
written whole or not at all; malformed input is rejected with a reason code and counted,
never crashes the service. A store failure answers ``error`` (retriable: the device keeps
the data and retries), so an outage is back-pressure, not loss. Data the store refuses
(:class:`~cloud.stores.base.StoreRejected`: bad sequence numbers, names, values the store
cannot hold) is answered ``rejected`` (non-retriable) and written to the dead-letter table
with its reason.

A reading far ahead of the cloud's clock (``max_future_s``) is refused: as
``timestamp_future`` (dead-lettered, final) when the device's clock model corrected it,
as ``clock_unsynced`` (:data:`~pymigrate.types.CLOCK_REJECTIONS`: retriable, the device
keeps it, takes the answer's server times as a clock sample and sends it again with a
corrected time) when it was stamped without a model.

Every rejection is written to the dead letters (device, batch, reason, peer, the whole
payload) before it is answered. The ack says ``dead_lettered`` -- the device may let go
of the data -- only when the cloud could also name the rejected sequence numbers in the
completeness ledger (a ``rejected`` gap record, detail = reason): that needs an envelope
that decodes, and a refusal a resend cannot change (the store refuses a value, a codec
cannot read a chunk that passed its checksum). An envelope that does not decode, or a
chunk whose checksum fails, was damaged on the way: the device keeps it and sends it
again. A rejection caused by configuration or identity
(:data:`~pymigrate.types.CONFIG_REJECTIONS`, e.g. ``device_mismatch``) keeps the data on
the device too; those dead letters (and ``clock_unsynced`` ones) are rate-limited per
device and reason, since the device keeps resending the same data.

Completeness (:mod:`cloud.stores.completeness`): the envelope's stream identity (agent
instance), chunk digests and gap records go to the store with the readings; the same
sequence numbers with other content are answered ``conflict`` (kept apart, never a
duplicate). The ack carries the batch's reading and gap counts; the device frees a batch
only when they match what it sent.

Exactly once: the store reads, updates and saves the device's idempotency state (acked
sequence ranges) in the write transaction, so a resend is acked ``duplicate`` and written
zero times, across ingest restarts and across replicas sharing the store.

Redundant gateways (optional ``gateway`` :class:`~cloud.dedup.GatewayDeduper`): readings
of the same sensor identity heard by several gateways (devices) within
``tolerance_ms`` are one event. Inside the write transaction, after the sequence check,
the deduper classifies the batch's new readings: a copy of an event another gateway
already delivered is acked but not stored (``gateway_dropped``), unless the policy
(``last``, ``best_quality``, ``average``) replaces the stored copy, which the store then
deletes and rewrites in the same transaction. The deduper's memory is per replica: route
a sensor's gateways to one replica (e.g. by shared-subscription group) or accept that
copies split across replicas are each stored. A write that fails after the deduper saw
the batch leaves a remembered event with no stored row; the gateway's retry is not
matched against its own copies, so it is stored then (another gateway's copy dropped in
between is covered by that retry).
"""

from __future__ import annotations

import collections
import functools
import inspect
import logging
import math
from typing import Any

import structlog

from agent.codec import open_chunk
from cloud.dedup import ConflictPolicy, ConflictResolver, GatewayDeduper
from cloud.stores.base import Admission, Store, StoreRejected
from cloud.stores.completeness import BatchMeta, ChunkDigest
from pymigrate.clock import Clock, WallClock
from pymigrate.envelope import DEFAULT_MAX_BYTES, Batch, decode_batch
from pymigrate.errors import DecodeError, ThrottledError
from pymigrate.types import (
    CLOCK_REJECTIONS,
    CONFIG_REJECTIONS,
    Ack,
    Gap,
    Quality,
    Reading,
    seq_runs_of,
)
from transports.base import Incoming

log = structlog.get_logger("pymigrate.cloud.ingest")

_CORRECTED = int(Quality.TIME_CORRECTED)


class _ClockUnsynced(Exception):
    """A reading far ahead of the cloud's clock that the device stamped without a clock
    model: answered ``clock_unsynced`` (retriable, not dead-lettered: the device maps
    it to true time once it has a model, and the answer carries the server times)."""


class IngestService:
    """Transport-independent ingest handler: ``await service.handle(incoming) -> Ack``."""

    def __init__(self, store: Store, *, clock: Clock | None = None,
                 max_batch_bytes: int = DEFAULT_MAX_BYTES,
                 limiter: Any | None = None,
                 gateway: GatewayDeduper | None = None,
                 conflict_policy: ConflictPolicy | str | None = None,
                 max_future_s: float = 86_400.0, allow_non_finite: bool = False) -> None:
        self.store = store
        # plausibility at the door: a timestamp further ahead than this (after the
        # agent's clock correction) or a NaN/inf value is refused with its reason
        self.max_future_ms = int(max_future_s * 1000)
        self.allow_non_finite = allow_non_finite
        self.gateway = gateway
        # None: no in-batch conflict resolution (every distinct seq is stored)
        self.conflicts = None if conflict_policy is None else ConflictResolver(conflict_policy)
        self.clock = clock or WallClock()
        self.max_batch_bytes = max_batch_bytes
        # .check(device_id) (plain or async) raising ThrottledError; optional open/close
        self.limiter = limiter
        self.counters: collections.Counter[str] = collections.Counter()
        self.config_dead_letter_interval_ms = 60_000
        self._config_dl_at: dict[tuple[str, str], int] = {}

    async def open(self) -> None:
        """Open what the service holds besides the store (a shared rate limiter)."""
        opener = getattr(self.limiter, "open", None)
        if opener is not None:
            await opener()

    async def close(self) -> None:
        closer = getattr(self.limiter, "close", None)
        if closer is not None:
            await closer()

    async def _reject(self, inc: Incoming, reason: str, t_recv: int, batch_id: str = "",
                      device: str = "", ledger: BatchMeta | None = None, **kw: Any) -> Ack:
        """Dead-letter, count, log with device and peer, answer ``rejected``.

        ``ledger``: the gap records that name the rejected sequence numbers; the device may
        let go only when they are stored too."""
        self.counters[f"rejected:{reason}"] += 1
        kept = await self._dead_letter(device or inc.channel_device_id or "", batch_id, reason,
                                       inc.payload, peer=inc.peer)
        if kept and ledger is not None and reason not in CONFIG_REJECTIONS:
            try:
                await self.store.write(device, batch_id, [], meta=ledger)
            except Exception as exc:  # the device keeps the data and retries
                self.counters["ledger_errors"] += 1
                log.error("rejected readings could not be recorded", device=device[:80],
                          batch_id=batch_id, error=str(exc)[:200])
                kept = False
        elif ledger is None:
            kept = False  # nothing names what the device would give up: it keeps it
        log.warning("batch rejected", reason=reason, batch_id=batch_id,
                    device=(device or inc.channel_device_id or "?")[:80], peer=inc.peer[:120],
                    transport=inc.transport, size=len(inc.payload), dead_lettered=kept, **kw)
        return Ack(batch_id=batch_id, status="rejected", t_recv_ms=t_recv,
                   t_send_ms=self.clock.time_ms(), reason=reason,
                   dead_lettered=kept and reason not in CONFIG_REJECTIONS)

    async def handle(self, inc: Incoming) -> Ack:
        t_recv = self.clock.time_ms()
        self.counters["batches_received"] += 1
        try:
            batch = decode_batch(inc.payload, max_bytes=self.max_batch_bytes)
        except DecodeError as exc:
            return await self._reject(inc, exc.reason, t_recv, error=str(exc)[:200])
        if inc.channel_device_id is not None and inc.channel_device_id != batch.device_id:
            # the channel (topic, path, certificate) vouches for another device
            return await self._reject(inc, "device_mismatch", t_recv, batch.batch_id,
                                      device=batch.device_id,
                                      channel=inc.channel_device_id[:80])
        if self.limiter is not None:
            try:
                took = self.limiter.check(batch.device_id)
                if inspect.isawaitable(took):  # a shared limiter asks Redis
                    await took
            except ThrottledError as exc:
                self.counters["throttled"] += 1
                return Ack(batch_id=batch.batch_id, status="throttled", t_recv_ms=t_recv,
                           t_send_ms=self.clock.time_ms(), retry_after_s=exc.retry_after_s)
        readings: list[Reading] = []
        digests: list[ChunkDigest] = []
        try:
            for chunk in batch.chunks:
                rs = open_chunk(chunk)
                if any(r.device_id != batch.device_id for r in rs):
                    raise DecodeError("reading device differs", reason="device_mismatch")
                digests.append(ChunkDigest(chunk.seq_first, chunk.seq_last, chunk.count,
                                           chunk.checksum, len(readings), len(rs)))
                readings.extend(rs)
        except DecodeError as exc:
            # a chunk failing its checksum was damaged on the way: no ledger, resend
            ledger = None if exc.reason == "corrupt" or not batch.instance else BatchMeta(
                batch.instance, batch.seq_base, batch.hwm, [],
                [Gap(c.seq_first, c.seq_last, c.count, "rejected", t_recv, [], exc.reason)
                 for c in batch.chunks], b"", inc.peer)
            return await self._reject(inc, exc.reason, t_recv, batch.batch_id,
                                      device=batch.device_id, ledger=ledger,
                                      error=str(exc)[:200])
        if batch.dead_letter:
            return await self._keep_as_dead_letters(inc, batch, readings, t_recv)
        admit = (functools.partial(self._admit, instance=batch.instance)
                 if self.gateway is not None or self.conflicts is not None else None)
        meta = BatchMeta(batch.instance, batch.seq_base, batch.hwm,
                         digests if batch.instance else [], batch.gaps, inc.payload,
                         inc.peer)
        try:
            self._plausible(readings, t_recv)
            result = await self.store.write(batch.device_id, batch.batch_id, readings,
                                            admit=admit, meta=meta)
        except _ClockUnsynced as exc:  # retriable: the device keeps the data
            return await self._reject(inc, "clock_unsynced", t_recv, batch.batch_id,
                                      device=batch.device_id, error=str(exc)[:200])
        except StoreRejected as exc:  # bad data: never retried, kept for inspection
            runs = seq_runs_of([r.seq for r in readings if r.seq >= 1])
            ledger = None if not batch.instance or not runs else BatchMeta(
                batch.instance, batch.seq_base, batch.hwm, [],
                [Gap(runs[0][0], runs[-1][1], sum(b - a + 1 for a, b in runs), "rejected",
                     t_recv, runs, exc.reason)], b"", inc.peer)
            return await self._reject(inc, exc.reason, t_recv, batch.batch_id,
                                      device=batch.device_id, ledger=ledger,
                                      error=str(exc)[:200])
        except Exception as exc:  # store outage: do not ack, the device keeps the data
            self.counters["store_errors"] += 1
            log.error("store write failed", batch_id=batch.batch_id, error=str(exc),
                      error_type=type(exc).__name__)
            return Ack(batch_id=batch.batch_id, status="error", t_recv_ms=t_recv,
                       t_send_ms=self.clock.time_ms(), reason="store_unavailable")
        self.counters["gateway_dropped"] += result.gateway_dropped
        self.counters["gateway_replaced"] += result.replaced
        self.counters["readings_written"] += result.written
        self.counters["readings_duplicate"] += result.duplicates
        self.counters["readings_conflict"] += result.conflicts
        self.counters["readings_late"] += result.late
        self.counters["gaps_received"] += len(batch.gaps)
        fresh = result.written + result.gateway_dropped
        if result.conflicts:
            status = "conflict"
            log.error("sequence numbers stored with other content: kept apart",
                      device=batch.device_id, instance=batch.instance, batch_id=batch.batch_id,
                      readings=result.conflicts, peer=inc.peer[:120])
        else:
            status = "ok" if fresh or not readings else "duplicate"
        self.counters[f"batches_{status}"] += 1
        return Ack(batch_id=batch.batch_id, status=status, t_recv_ms=t_recv,
                   t_send_ms=self.clock.time_ms(), accepted=result.written,
                   duplicates=result.duplicates, count=len(readings), gaps=len(batch.gaps),
                   conflicts=result.conflicts)

    async def _keep_as_dead_letters(self, inc: Incoming, batch: Batch,
                                    readings: list[Reading], t_recv: int) -> Ack:
        """The device gives these chunks up (``batch.dead_letter``, e.g. ``expired`` by
        its retention) and asks the cloud to keep them: the payload goes to the dead
        letters and their sequence numbers to the ledger as gaps of that reason, nothing
        is stored as readings. Acked ``ok`` with ``dead_lettered`` once both are written
        (only then may the device delete them); a failure answers ``error`` (retriable)."""
        reason = batch.dead_letter
        runs = seq_runs_of([r.seq for r in readings if r.seq >= 1])
        gaps = list(batch.gaps)
        if runs:
            gaps.append(Gap(runs[0][0], runs[-1][1], sum(b - a + 1 for a, b in runs),
                            reason, t_recv, runs, "dead_letter"))
        kept = await self._dead_letter(batch.device_id, batch.batch_id, reason, inc.payload,
                                       peer=inc.peer)
        try:
            if not kept:
                raise RuntimeError("dead letter not written")
            await self.store.write(batch.device_id, batch.batch_id, [], meta=BatchMeta(
                batch.instance, batch.seq_base, batch.hwm, [], gaps, b"", inc.peer))
        except Exception as exc:  # the device keeps the chunks and sends them again
            self.counters["store_errors"] += 1
            log.error("dead-letter request not kept", batch_id=batch.batch_id,
                      device=batch.device_id[:80], error=str(exc)[:200])
            return Ack(batch_id=batch.batch_id, status="error", t_recv_ms=t_recv,
                       t_send_ms=self.clock.time_ms(), reason="store_unavailable")
        self.counters["batches_dead_letter_requests"] += 1
        self.counters[f"readings_dead_lettered:{reason[:32]}"] += len(readings)
        log.info("chunks kept as dead letters at the device's request", reason=reason,
                 device=batch.device_id[:80], batch_id=batch.batch_id, readings=len(readings))
        return Ack(batch_id=batch.batch_id, status="ok", t_recv_ms=t_recv,
                   t_send_ms=self.clock.time_ms(), count=len(readings), gaps=len(batch.gaps),
                   dead_lettered=True)

    def _plausible(self, readings: list[Reading], now_ms: int) -> None:
        limit = now_ms + self.max_future_ms
        for r in readings:
            if r.ts_ms > limit and not r.quality & _CORRECTED:
                raise _ClockUnsynced(
                    f"{r.sensor[:40]} seq {r.seq}: timestamp {r.ts_ms} is "
                    f"{(r.ts_ms - now_ms) / 86_400_000:.1f} days ahead of the cloud's clock "
                    "and was not corrected by a clock model")
        for r in readings:
            if r.ts_ms > limit:
                raise StoreRejected(
                    f"{r.sensor[:40]} seq {r.seq}: timestamp {r.ts_ms} is "
                    f"{(r.ts_ms - now_ms) / 86_400_000:.1f} days ahead of the cloud's clock",
                    reason="timestamp_future")
            if not self.allow_non_finite and not math.isfinite(r.value):
                raise StoreRejected(f"{r.sensor[:40]} seq {r.seq}: value {r.value} (set "
                                    "cloud.allow_non_finite to keep NaN/inf)",
                                    reason="non_finite_value")

    def _admit(self, fresh: list[Reading], instance: str = "") -> Admission:
        """Store-side filter over a batch's not-yet-stored readings (inside the write
        transaction): same-instant conflicts within the batch, then other gateways."""
        skip: list[Reading] = []
        if self.conflicts is not None:
            fresh, skip = self._resolve_conflicts(fresh)
        if self.gateway is None:
            return Admission(write=fresh, skip=skip, delete=[])
        res = self.gateway.offer(fresh, instance)
        write = list(res.store)
        delete: list[tuple[str, str, int]] = []
        incoming = {id(r) for r in fresh}
        for (old, new), inst in zip(res.replaced, res.replaced_instances, strict=True):
            delete.append((old.device_id, inst, old.seq))
            write.append(new)  # the incoming copy, or (average) the merged stored one
        kept = {id(r) for r in write if id(r) in incoming}
        skip.extend(r for r in fresh if id(r) not in kept)
        return Admission(write=write, skip=skip, delete=delete)

    def _resolve_conflicts(self, rs: list[Reading]) -> tuple[list[Reading], list[Reading]]:
        """Readings of one series at one instant within the batch: keep one (policy)."""
        assert self.conflicts is not None
        first: dict[tuple[str, int, str, str], int] = {}
        merged: dict[int, tuple[Reading, int]] = {}  # index -> (kept reading, copies)
        losers: list[Reading] = []
        for i, r in enumerate(rs):
            a = r.agg  # aggregates of different functions share sensor and instant
            j = first.setdefault((r.sensor, r.ts_ms, a.rule, a.fn) if a else
                                 (r.sensor, r.ts_ms, "", ""), i)
            if j == i:
                continue
            kept, n = merged.get(j, (rs[j], 1))
            res = self.conflicts.resolve(kept, r, count=n)
            if res.action == "replace" and res.reading is r:
                losers.append(kept)
            else:
                losers.append(r)
            merged[j] = (res.reading, n + 1)
        if not merged:
            return rs, []
        self.counters["conflicts_resolved"] += len(losers)
        winners = set(first.values())
        out = [merged[i][0] if i in merged else r for i, r in enumerate(rs) if i in winners]
        return out, losers

    async def _dead_letter(self, device_id: str, batch_id: str, reason: str,
                           payload: bytes, *, peer: str = "") -> bool:
        """Keep a rejected payload (whole: it is the only copy once the device lets go).
        True when it is kept (or, for a configuration rejection the device keeps the data
        of, when a recent dead letter of that device and reason already says it)."""
        if reason in CONFIG_REJECTIONS or reason in CLOCK_REJECTIONS:
            key = (device_id, reason)
            now = self.clock.time_ms()
            if now - self._config_dl_at.get(key, -(2**62)) < self.config_dead_letter_interval_ms:
                self.counters["dead_letters_rate_limited"] += 1
                return True
            if len(self._config_dl_at) > 10_000:
                self._config_dl_at.clear()
            self._config_dl_at[key] = now
        self.counters["dead_letters"] += 1
        try:
            await self.store.dead_letter(device_id[:256], batch_id[:256], reason, payload,
                                         peer=peer[:256])
        except Exception as exc:  # dead-lettering must never take the ingest down
            self.counters["dead_letter_errors"] += 1
            logging.getLogger(__name__).warning("dead-letter write failed: %s", exc)
            return False
        return True
