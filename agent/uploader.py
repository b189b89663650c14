"""The uploader stage: durable buffer -> batches -> uplinks, under the retry controller.

Takes the highest-priority oldest chunks, packs a batch within the current AIMD limit and
the transport's ``max_payload``, sends it with an adaptive number of batches in flight and
acks it out of the buffer on an end-to-end ack. A failed batch goes back to the head of the
buffer; a batch the cloud rejects, or one older than its retention, is dead-lettered with
a logged, counted reason (expired chunks with ``retention_action = "dead_letter"``: sent in
a batch asking the cloud to keep them as dead letters, deleted once it acked that).
Uplinks form an ordered failover list (e.g. MQTT then CoAP), each with its own circuit
breaker and backoff. Readings stamped without a clock model wait for one
(:class:`~agent.retry.state.ClockFix`: sync pings go at once) and go with mapped times; a
``clock_unsynced`` refusal keeps the chunks and its server times are a clock sample.

Waiting is sleeping: the loop blocks on the buffer's data event, on in-flight completions
and on computed deadlines (backoff, breaker, throttle, window, linger), never on a tick.
It only calls ``take``/``ack``/``release`` on the buffer, so it never blocks ingest.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import math
import random
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import structlog

from agent.retry.backoff import agent_rng, make_backoff
from agent.retry.breaker import BreakerState, CircuitBreaker
from agent.retry.config import RetryConfig
from agent.retry.power import PowerState
from agent.retry.quality import Aimd, NetworkQuality
from agent.retry.state import (
    AckCallback,
    ClockFix,
    DeadLetterCallback,
    EventCallback,
    StoredChunkLike,
    UploadBuffer,
)
from agent.retry.state import Destination as _Slot
from agent.retry.state import PendingBatch as _Batch
from agent.retry.windows import parse_windows
from pymigrate.clock import Clock
from pymigrate.envelope import Batch, encode_batch
from pymigrate.errors import PayloadRejected, ThrottledError, TransportError
from pymigrate.types import CLOCK_REJECTIONS, CONFIG_REJECTIONS, Ack, Priority
from transports.base import Uplink

__all__ = ["AckCallback", "EventCallback", "StoredChunkLike", "UploadBuffer", "Uploader"]

log = structlog.get_logger("agent.uploader")

ENVELOPE_OVERHEAD = 96  # header, ids, send time, trailer (bytes, generous)
CHUNK_OVERHEAD = 64  # per-chunk msgpack fields besides the payload
_PACE_CAP_S = 3600.0  # the longest learnt spacing between sends under a quota
_ATTEMPTS_CAP = 65_536  # remembered attempt counts (chunks released but not yet re-taken)


class Uploader:
    """Drains the durable buffer into an ordered failover list of uplinks."""

    def __init__(self, buffer: UploadBuffer, uplinks: Sequence[Uplink], *, device_id: str,
                 clock: Clock, config: RetryConfig | None = None,
                 on_ack: AckCallback | None = None, on_event: EventCallback | None = None,
                 on_dead_letter: DeadLetterCallback | None = None,
                 power: PowerState | None = None, rng: random.Random | None = None,
                 wants_sync: Callable[[], bool] | None = None,
                 clock_fix: ClockFix | None = None, retention_action: str = "gap") -> None:
        if not uplinks:
            raise ValueError("Uploader needs at least one uplink")
        self.cfg = cfg = config or RetryConfig()
        self.buffer = buffer
        self.device_id = device_id
        self.clock = clock
        self.on_ack = on_ack
        self.on_event = on_event
        self.on_dead_letter = on_dead_letter
        self.wants_sync = wants_sync
        self.clock_fix = clock_fix
        # what retention does with an expired chunk: "gap" gives it up with a gap record,
        # "dead_letter" uploads it to the cloud's dead letters (buffer.retention_action)
        self.retention_action = retention_action
        self._clock_refused: set[int] = set()  # chunk ids refused as clock_unsynced
        self._hold_ping_at = 0.0
        self.rng = rng or agent_rng(device_id, cfg.seed)
        self.quality = NetworkQuality(alpha=cfg.rtt_alpha, beta=cfg.rtt_beta, k=cfg.rtt_k)
        self.aimd = Aimd(cfg)
        self.windows = parse_windows(cfg.windows, cfg.window_duration_s)
        self.power = power or PowerState(cfg.profile, low_battery_pct=cfg.low_battery_pct,
                                         path=cfg.power_file or None)
        self._slots = [
            _Slot(u, CircuitBreaker(u.name, failures=cfg.breaker_failures,
                                    failure_rate=cfg.breaker_failure_rate,
                                    window=cfg.breaker_window, min_calls=cfg.breaker_min_calls,
                                    open_base_s=cfg.breaker_open_base_s,
                                    open_cap_s=cfg.breaker_open_cap_s, rng=self.rng,
                                    on_change=self._breaker_changed),
                  make_backoff(cfg.backoff, cfg.backoff_base_s, cfg.backoff_cap_s, self.rng))
            for u in uplinks
        ]
        self._inflight: set[asyncio.Task[None]] = set()
        self._settling: set[asyncio.Task[None]] = set()  # buffer bookkeeping, never cancelled
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._stopping = False
        self._draining = False
        self._running = False
        self._linger_until: float | None = None
        self._empty_takes = 0
        self._next_power_check = 0.0
        self._last_exchange = clock.monotonic()
        self._attempts: dict[int, int] = {}
        self._isolate: set[int] = set()  # chunk ids to resend alone (a batch was rejected)
        self._suspect: set[int] = set()  # chunk ids whose last attempt failed on the link
        self._bseq = itertools.count(1)
        # batch ids are unique across restarts: an ack queued for a killed process can
        # never free a batch of this one (the rng is seeded from os.urandom unless a seed
        # is configured for a reproducible simulation)
        self._epoch = f"{self.rng.getrandbits(32):08x}"
        self.blocked: dict[str, str] = {}  # uplink -> rejection that a resend cannot fix
        self.counts: collections.Counter[str] = collections.Counter()
        self.batches_by_attempt: collections.Counter[int] = collections.Counter()
        self.readings_by_attempt: collections.Counter[int] = collections.Counter()
        self.dead_letters: collections.Counter[str] = collections.Counter()

    # ------------------------------------------------------------------ public API
    async def run(self) -> None:
        """Upload forever (until cancelled, or until :meth:`drain` ends it)."""
        if self._running:
            raise RuntimeError("Uploader.run() is already running")
        self._running = True
        self._stopping = False
        try:
            while not self._stopping:
                await self._cycle()
        finally:
            await self._cancel_inflight()
            self._running = False

    async def drain(self, deadline_s: float) -> bool:
        """Graceful stop: keep sending what is pending for up to ``deadline_s`` seconds,
        then stop ``run()``; unsent batches are released back to the buffer.

        Returns True when everything sendable was acked before the deadline.
        """
        self._draining = True
        self._idle.clear()
        self._wake.set()
        own: asyncio.Task[None] | None = None
        if not self._running:
            own = asyncio.create_task(self.run(), name="agent[uploader-drain]")
        end = self.clock.monotonic() + deadline_s
        await self._race(self._idle.wait(), self.clock.sleep_until(end))
        drained = self._idle.is_set()
        self._stopping = True
        self._wake.set()
        await self._cancel_inflight()
        if own is not None:
            await own
        self._draining = False
        log.info("uploader.drained", drained=drained, acked=self.counts["batches_acked"])
        return drained

    def stop(self) -> None:
        """Ask ``run()`` to return (in-flight batches are cancelled and released)."""
        self._stopping = True
        self._wake.set()

    def stats(self) -> dict[str, Any]:
        """Counters and gauges for metrics and the health status."""
        now = self.clock.monotonic()
        return {
            **{k: self.counts[k] for k in (
                "batches_sent", "batches_acked", "batches_failed", "batches_throttled",
                "batches_rejected", "bytes_sent", "readings_acked", "wakeups", "loop_wakeups",
                "duplicates", "readings_dead_lettered", "sync_pings", "conflicts",
                "readings_conflicted", "gaps_acked", "ack_mismatches", "readings_given_up",
                "readings_dead_lettered_in_cloud", "clock_holds", "clock_rejections")},
            "blocked": dict(self.blocked),
            "dead_letters": dict(self.dead_letters),
            "attempts": dict(sorted(self.batches_by_attempt.items())),
            "readings_by_attempt": dict(sorted(self.readings_by_attempt.items())),
            "inflight": len(self._inflight),
            "inflight_limit": self.aimd.inflight_limit,
            "batch_limit_bytes": self.aimd.effective_batch(self.quality, ENVELOPE_OVERHEAD),
            "rtt_ewma_s": self.quality.srtt,
            "rtt_dev_s": self.quality.rttvar,
            "success_rate": self.quality.success_rate,
            "throughput_bps": self.quality.throughput_bps,
            "profile": self.power.profile,
            "battery_pct": self.power.battery_pct,
            "uplinks": {
                s.name: {"breaker": s.breaker.state(now).value,
                         "transitions": dict(s.breaker.transitions), **dict(s.counts)}
                for s in self._slots
            },
        }

    # ------------------------------------------------------------------ main loop
    async def _cycle(self) -> None:
        """One decision. Every branch that waits returns, so the next pass re-decides."""
        self._wake.clear()
        now = self.clock.monotonic()
        if self.power.path is not None and now >= self._next_power_check:
            self.power.refresh()
            self._next_power_check = now + self.cfg.power_check_s
        minp = self.power.min_priority
        if not self._draining and not self._inflight_full():
            # block until there is something to send (the buffer's event), or we are woken
            sync_at = None
            if self.wants_sync is not None and self.wants_sync():
                sync_at = self._last_exchange + self.cfg.sync_ping_s
            woke = await self._wait(self.buffer.wait_for_data(minp), deadline=sync_at)
            if (sync_at is not None and woke == "deadline"
                    and self.clock.monotonic() >= sync_at and self.wants_sync is not None
                    and self.wants_sync()):
                await self._sync_ping()
                return
            if woke != "ready":
                # we slept: a new episode of data starts its own linger
                self._linger_until = None
                if woke != "data":
                    return
            now = self.clock.monotonic()
        wall = self.clock.time_ms()
        if not self.windows.is_open(wall):
            opens = now + (self.windows.next_open_ms(wall) - wall) / 1000.0
            await self._wait(None, deadline=opens)
            return
        if self._inflight_full():
            await self._wait(None)
            return
        if self.clock_fix is not None and self.clock_fix.holding():
            await self._hold_for_clock(now)
            return
        slot, mode, ready_at = self._pick(now)
        if slot is None or mode is None or ready_at > now:
            await self._wait(None, deadline=ready_at)
            return
        if not self._draining and not await self._lingered(now):
            return
        await self._take_and_send(slot, mode == "probe", minp)

    async def _hold_for_clock(self, now: float) -> None:
        """Readings stamped without a clock model wait for one (they would reach the
        cloud with the RTC's time, days off after a jump): send a sync ping (the probe,
        when the breaker is half-open) and sleep until its answer; a link that fails is
        paced by the backoff and the breaker, an answer without a model by a second.
        :class:`ClockFix` bounds the hold (a few such answers end it)."""
        if self._inflight:  # its completion wakes us
            await self._wait(None)
            return
        slot, mode, ready_at = self._pick(now)
        if slot is None or mode is None or ready_at > now:
            await self._wait(None, deadline=ready_at)
            return
        if now < self._hold_ping_at:
            await self._wait(None, deadline=self._hold_ping_at)
            return
        self.counts["clock_holds"] += 1
        self._hold_ping_at = now + min(self.cfg.sync_ping_s, 1.0)
        self._ping(slot, probe=mode == "probe")
        await self._wait(None)

    def _inflight_full(self) -> bool:
        return len(self._inflight) >= max(1, self.aimd.inflight_limit)

    def _pick(self, now: float) -> tuple[_Slot | None, str | None, float]:
        """First uplink (in failover order) whose breaker lets a batch through."""
        wait_until = math.inf
        for slot in self._slots:
            mode = slot.breaker.allow(now)
            if mode is None:
                if slot.breaker.state(now) is BreakerState.OPEN:
                    wait_until = min(wait_until, slot.breaker.open_until)
                continue  # half-open with its probe in flight: an in-flight completion wakes us
            return slot, mode, max(slot.retry_at, slot.throttle_until,
                                   slot.last_send_at + slot.pace_s)
        return None, None, wait_until

    async def _lingered(self, now: float) -> bool:
        """Metered/battery: hold data for ``linger`` to send fewer, larger batches;
        critical data ends the wait at once. True when it is time to take."""
        linger = {"metered": self.cfg.linger_metered_s,
                  "battery": self.cfg.linger_battery_s}.get(self.power.profile, 0.0)
        if linger <= 0:
            return True
        if self._linger_until is None:
            self._linger_until = now + linger
        if now >= self._linger_until:
            return True
        woke = await self._wait(self.buffer.wait_for_data(Priority.CRITICAL),
                                deadline=self._linger_until)
        if woke in ("data", "ready"):
            self._linger_until = now  # critical data: flush everything in this wake-up
        return False

    async def _take_and_send(self, slot: _Slot, probe: bool, minp: Priority) -> None:
        cfg = self.cfg
        if probe:
            limit = cfg.probe_max_bytes
        else:
            limit = min(self.aimd.effective_batch(self.quality, ENVELOPE_OVERHEAD),
                        slot.uplink.max_payload - ENVELOPE_OVERHEAD)
        max_chunks = 1 if probe else cfg.max_chunks
        room = max(1, (limit - ENVELOPE_OVERHEAD) // (CHUNK_OVERHEAD + 1))
        items = list(await self.buffer.take(max(1, limit - CHUNK_OVERHEAD),
                                            min(max_chunks, room), minp))
        gap_rows: list[Any] = []
        take_gaps = getattr(self.buffer, "take_gaps", None)
        if take_gaps is not None and not probe:
            gap_rows = list(await take_gaps(items[0].chunk.device_id if items else None))
        elif take_gaps is not None and not items:
            # a half-open breaker with only gap records left: they are the probe (else
            # the breaker would never close and the records never leave)
            gap_rows = list(await take_gaps(None, limit=8))
        if not items and gap_rows:
            self._spawn(slot, self._gap_batch(gap_rows, probe))
            return
        if not items:
            self._linger_until = None
            if not self._inflight:
                if self._draining:
                    self._idle.set()
                    await self._wait(None)
                    return
                # the buffer said "data" but gave none: do not spin on it
                self._empty_takes += 1
                if self._empty_takes > 2:
                    await self._wait(None, deadline=self.clock.monotonic() + cfg.backoff_base_s)
            else:
                await self._wait(None)
            return
        self._empty_takes = 0
        items, dead_letter = await self._screen(items)
        if self.clock_fix is not None and items and not dead_letter:
            items = await self.clock_fix.restamp(items, self._clock_refused)
        if items and gap_rows and (dead_letter or
                                   gap_rows[0].device_id != items[0].chunk.device_id):
            await self.buffer.release([], failed=False, gap_ids=[g.id for g in gap_rows])
            gap_rows = []
        if not items:
            if gap_rows:
                self._spawn(slot, self._gap_batch(gap_rows))
            return
        packed = await self._pack(slot, items, probe, gap_rows, dead_letter)
        if packed is None:
            if gap_rows:
                await self.buffer.release([], failed=False, gap_ids=[g.id for g in gap_rows])
            return
        slot, batch = packed
        probe = batch.probe
        if probe:
            slot.breaker.begin_probe()
        self._spawn(slot, batch)

    def _batch(self, device_id: str, batch_id: str, chunks: list[Any], sent_ms: int,
               gap_rows: Sequence[Any] = (), dead_letter: str = "") -> Batch:
        """A batch with this device's stream identity (when the buffer keeps one)."""
        stream_of = getattr(self.buffer, "stream_of", None)
        instance, base, hwm = stream_of(device_id) if stream_of is not None else ("", 1, 0)
        return Batch(device_id, batch_id, chunks, sent_ms, instance, base, hwm,
                     [g.gap for g in gap_rows], dead_letter)

    def _new_batch_id(self, device_id: str, tag: str) -> str:
        return f"{device_id}-{self._epoch}-{tag}-{next(self._bseq)}"

    def _gap_batch(self, gap_rows: Sequence[Any], probe: bool = False) -> _Batch:
        """A batch that carries only gap records (what the device gave up, and why)."""
        dev = gap_rows[0].device_id
        batch_id = self._new_batch_id(dev, "gaps")
        payload = encode_batch(self._batch(dev, batch_id, [], self.clock.time_ms(), gap_rows))
        return _Batch([], 1, batch_id, payload, probe, [g.id for g in gap_rows])

    async def _sync_ping(self) -> None:
        """An empty batch whose ack carries server times (clock sync while idle)."""
        now = self.clock.monotonic()
        self._last_exchange = now
        slot, mode, ready_at = self._pick(now)
        if (slot is None or mode != "send" or ready_at > now or self._inflight_full()
                or not self.windows.is_open(self.clock.time_ms())):
            return
        self._ping(slot, probe=False)

    def _ping(self, slot: _Slot, *, probe: bool) -> None:
        self._last_exchange = self.clock.monotonic()
        batch_id = self._new_batch_id(self.device_id, "sync")
        payload = encode_batch(self._batch(self.device_id, batch_id, [], self.clock.time_ms()))
        self.counts["sync_pings"] += 1
        if probe:
            slot.breaker.begin_probe()
        self._spawn(slot, _Batch([], 1, batch_id, payload, probe))

    def _spawn(self, slot: _Slot, batch: _Batch) -> None:
        task = asyncio.create_task(self._send(slot, batch),
                                   name=f"agent[uploader:{slot.name}:{batch.batch_id}]")
        self._inflight.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._wake.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("uploader.send_task_failed", exc_info=task.exception())
            self.counts["send_task_errors"] += 1

    # ------------------------------------------------------------------ batching
    async def _screen(self, items: list[StoredChunkLike]
                      ) -> tuple[list[StoredChunkLike], str]:
        """Dead-letter expired/exhausted chunks; keep one device; isolate suspects.

        Returns the chunks to send and, when they are expired chunks to upload to the
        cloud's dead letters (``retention_action = "dead_letter"``), that reason."""
        cfg = self.cfg
        # age as the buffer measures it (its own monotonic clock, kept across runs), never
        # the wall clock: a clock jump must not make data old. A buffer that does not
        # measure age (no ``age_ms``) never expires anything here.
        limit_ms = cfg.retention_s * 1000
        expired = [i for i in items if getattr(i, "expired", False) or (
            limit_ms > 0 and getattr(i, "age_ms", None) is not None
            and i.age_ms > limit_ms)]  # type: ignore[attr-defined]
        if expired and self.retention_action == "dead_letter":
            # sent on their own, asking the cloud to keep them as dead letters; they are
            # deleted here only once it acked them (a failed send keeps them)
            dev = expired[0].chunk.device_id
            send = [i for i in expired if i.chunk.device_id == dev]
            ids = {i.id for i in send}
            await self._spill([i for i in items if i.id not in ids])
            return send, "expired"
        gone = {i.id for i in expired}
        exhausted = [i for i in items if i.id not in gone and cfg.max_attempts > 0
                     and self._attempt_of(i) >= cfg.max_attempts]
        gone.update(i.id for i in exhausted)
        if expired:
            await self._dead_letter(expired, "expired")
        if exhausted:
            await self._dead_letter(exhausted, "max_attempts")
        items = [i for i in items if i.id not in gone]
        if not items:
            return items, ""
        keep: list[StoredChunkLike] = []
        rest: list[StoredChunkLike] = []
        dev = items[0].chunk.device_id
        suspect = next((i for i in items if i.id in self._isolate), None)
        for i in items:
            if suspect is not None:
                (keep if i is suspect else rest).append(i)
            else:
                (keep if i.chunk.device_id == dev else rest).append(i)
        if rest:
            await self._spill(rest)
        return keep, ""

    def _attempt_of(self, item: StoredChunkLike) -> int:
        """Attempts already made for this chunk (ours in this process, else the buffer's)."""
        return self._attempts.get(item.id, item.attempts)

    async def _spill(self, items: Sequence[StoredChunkLike]) -> None:
        """Give chunks back unsent (not an attempt): remember their own attempt count."""
        for i in items:
            self._attempts[i.id] = self._attempt_of(i)
        await self.buffer.release([i.id for i in items], failed=False)

    async def _pack(self, slot: _Slot, items: list[StoredChunkLike], probe: bool,
                    gap_rows: Sequence[Any] = (), dead_letter: str = ""
                    ) -> tuple[_Slot, _Batch] | None:
        """Encode a batch that fits ``max_payload``; spill the tail back to the buffer.

        A chunk that already failed is retried in a minimal batch (``batch_min_bytes``):
        on a lossy link a smaller attempt is likelier to get through, so a chunk is not
        dragged through several failures by the size of its companions.
        """
        if len(items) > 1 and items[0].id in self._suspect:
            keep, total = 1, len(items[0].chunk.payload)
            while keep < len(items) and (
                    total + len(items[keep].chunk.payload) <= self.cfg.batch_min_bytes):
                total += len(items[keep].chunk.payload)
                keep += 1
            await self._spill(items[keep:])
            items = items[:keep]
        first = items[0].chunk
        sent_ms = self.clock.time_ms()
        while True:
            payload = encode_batch(self._batch(first.device_id, "", [i.chunk for i in items],
                                               sent_ms, gap_rows, dead_letter))
            if len(payload) <= slot.uplink.max_payload or len(items) == 1:
                break
            cut = max(1, len(items) // 2)
            await self._spill(items[cut:])
            items = items[:cut]
        attempt = 1 + max(self._attempt_of(i) for i in items)
        batch_id = self._new_batch_id(first.device_id, f"{first.seq_first}-a{attempt}")
        payload = encode_batch(self._batch(first.device_id, batch_id,
                                           [i.chunk for i in items], sent_ms, gap_rows,
                                           dead_letter))
        if len(payload) > slot.uplink.max_payload:
            slot.counts["oversized_for_uplink"] += 1
            if len(payload) > max(s.uplink.max_payload for s in self._slots):
                await self._dead_letter(items, "oversized")
                return None
            now = self.clock.monotonic()
            other = next((s for s in self._slots if s.uplink.max_payload >= len(payload)
                          and s.breaker.allow(now) == "send"
                          and max(s.retry_at, s.throttle_until) <= now), None)
            if other is None:
                # the larger uplink is unavailable right now: wait, do not spin
                await self._spill(items)
                slot.retry_at = now + slot.backoff.next_delay()
                return None
            slot, probe = other, False
        for i in items:
            self._attempts[i.id] = attempt
        while len(self._attempts) > _ATTEMPTS_CAP:
            self._attempts.pop(next(iter(self._attempts)))
        if len(self._suspect) > _ATTEMPTS_CAP:
            self._suspect.clear()  # only a batching hint: forgetting it loses nothing
        return slot, _Batch(items, attempt, batch_id, payload, probe,
                            [g.id for g in gap_rows], dead_letter)

    # ------------------------------------------------------------------ one attempt
    async def _send(self, slot: _Slot, batch: _Batch) -> None:
        size = len(batch.payload)
        timeout = self.quality.timeout(size, self.cfg)
        t0 = self.clock.monotonic()
        w0 = float(self.clock.time_ms())
        slot.last_send_at = t0
        self.counts["batches_sent"] += 1
        self.counts["bytes_sent"] += size
        slot.counts["sent"] += 1
        outcome: Coroutine[Any, Any, None]
        try:
            await self._ensure_connected(slot)
            ack = await slot.uplink.send(batch.payload, batch_id=batch.batch_id, timeout=timeout)
        except asyncio.CancelledError:
            slot.breaker.record_aborted(probe=batch.probe)
            await asyncio.shield(self._settle(self._release(batch)))
            raise
        except ThrottledError as exc:
            outcome = self._throttled(slot, batch, exc.retry_after_s)
        except PayloadRejected as exc:
            if exc.reason in CLOCK_REJECTIONS:
                ans = exc.attrs.get("ack")
                if isinstance(ans, Ack) and self.on_ack is not None:  # a clock sample
                    self.on_ack(ans, w0, float(self.clock.time_ms()))
                outcome = self._clock_refused_batch(slot, batch, exc.reason)
            else:
                outcome = self._rejected(slot, batch, exc.reason,
                                         bool(exc.attrs.get("dead_lettered", False)))
        except (TransportError, OSError, TimeoutError) as exc:
            # an attempt that used up its timeout doubles the next one (Karn)
            spent = self.clock.monotonic() - t0
            outcome = self._failed(slot, batch, exc, timed_out=spent >= 0.9 * timeout)
        else:
            rtt = self.clock.monotonic() - t0
            if ack.status in ("ok", "duplicate", "conflict"):
                mismatch = self._ack_mismatch(batch, ack)
                if mismatch:
                    outcome = self._failed(slot, batch, TransportError(mismatch))
                else:
                    outcome = self._acked(slot, batch, ack, rtt, w0)
            elif ack.status == "throttled":
                outcome = self._throttled(slot, batch, ack.retry_after_s)
            elif ack.status == "rejected" and ack.reason in CLOCK_REJECTIONS:
                if self.on_ack is not None:  # the answer's server times: a clock sample
                    self.on_ack(ack, w0, float(self.clock.time_ms()))
                outcome = self._clock_refused_batch(slot, batch, ack.reason)
            elif ack.status == "rejected":
                outcome = self._rejected(slot, batch, ack.reason or "rejected",
                                         ack.dead_lettered)
            else:
                outcome = self._failed(slot, batch,
                                       TransportError(f"unknown ack status {ack.status!r}"))
        # the outcome's ack/release completes even if we are cancelled meanwhile
        await asyncio.shield(self._settle(outcome))

    def _ack_mismatch(self, batch: _Batch, ack: Ack) -> str:
        """Why an ack cannot free this batch ('' when it can): it must name the batch and,
        when the cloud reports counts (end-to-end acks), the readings and gap records the
        batch carried. A transport-only ack (``reason == "transport"``) has no counts."""
        problem = ""
        if ack.batch_id and ack.batch_id != batch.batch_id:
            problem = f"ack for batch {ack.batch_id!r} answered batch {batch.batch_id!r}"
        elif ack.count >= 0 and ack.reason != "transport" and (
                ack.count != batch.readings or ack.gaps != len(batch.gap_ids)):
            problem = (f"ack of batch {batch.batch_id} counts {ack.count} readings and "
                       f"{ack.gaps} gaps, the batch has {batch.readings} and "
                       f"{len(batch.gap_ids)}")
        if problem:
            self.counts["ack_mismatches"] += 1
            log.error("uploader.ack_mismatch", batch_id=batch.batch_id, problem=problem)
        return problem

    async def _release(self, batch: _Batch, *, failed: bool = True) -> None:
        await self.buffer.release(batch.ids, failed=failed, gap_ids=batch.gap_ids)

    async def _ensure_connected(self, slot: _Slot) -> None:
        if slot.connected:
            return
        async with slot.lock:
            if not slot.connected:
                await slot.uplink.connect()
                slot.connected = True

    async def _acked(self, slot: _Slot, batch: _Batch, ack: Ack, rtt: float, w0: float) -> None:
        if batch.items or batch.gap_ids:
            await self.buffer.ack(batch.ids, batch.gap_ids)
            self.counts["gaps_acked"] += len(batch.gap_ids)
        if ack.status == "conflict":
            # another agent sends these sequence numbers under our identity (a cloned
            # image?): the cloud kept our copy apart; say so loudly and stay unhealthy
            self.counts["conflicts"] += 1
            self.counts["readings_conflicted"] += ack.conflicts
            self.blocked["identity"] = "conflict"
            log.error("uploader.identity_conflict", batch_id=batch.batch_id,
                      readings=ack.conflicts, hint="another agent uses this device id and "
                      "instance id (cloned data_dir?): give each gateway its own device.id "
                      "or delete the copied data_dir/*.instance file")
        slot_blocked = self.blocked.pop(slot.name, None)
        if slot_blocked:
            log.warning("uploader.unblocked", uplink=slot.name, was=slot_blocked)
        w1 = float(self.clock.time_ms())
        self._last_exchange = self.clock.monotonic()
        for i in batch.items:
            self._attempts.pop(i.id, None)
            self._isolate.discard(i.id)
            self._suspect.discard(i.id)
        if batch.items and batch.dead_letter and ack.dead_lettered:
            # the cloud keeps them as dead letters (and their numbers as gaps): deleted
            n = batch.readings
            self.counts["readings_dead_lettered"] += n
            self.counts["readings_dead_lettered_in_cloud"] += n
            self.dead_letters[batch.dead_letter] += len(batch.items)
            log.warning("uploader.dead_letter", device=self.device_id, chunks=len(batch.items),
                        readings=n, reason=batch.dead_letter, in_cloud=True)
            self._event("dead_letter", reason=batch.dead_letter, chunks=len(batch.items),
                        readings=n)
        elif batch.items:
            self.counts["batches_acked"] += 1
            self.counts["readings_acked"] += batch.readings
            if ack.status == "duplicate":
                self.counts["duplicates"] += 1
            self.batches_by_attempt[batch.attempt] += 1
            self.readings_by_attempt[batch.attempt] += batch.readings
        slot.counts["acked"] += 1
        slot.failures_in_row = 0
        slot.backoff.reset()
        slot.retry_at = 0.0
        slot.pace_s = slot.pace_s * 0.98 if slot.pace_s > 0.1 else 0.0
        slot.breaker.record_success(probe=batch.probe)
        normal = self.quality.record_success(rtt, len(batch.payload))
        self.aimd.on_success(normal,
                             grow_inflight=self.clock.monotonic() >= slot.throttle_hold_until)
        if self.on_ack is not None:
            self.on_ack(ack, w0, w1)

    async def _failed(self, slot: _Slot, batch: _Batch, exc: BaseException, *,
                      timed_out: bool = False) -> None:
        if batch.items or batch.gap_ids:
            await self._release(batch)
            self._suspect.update(batch.ids)
        now = self.clock.monotonic()
        self.counts["batches_failed"] += 1
        slot.counts["failed"] += 1
        self.quality.record_failure(len(batch.payload), timed_out=timed_out)
        self.aimd.decrease()
        slot.breaker.record_failure(now, probe=batch.probe)
        slot.retry_at = now + slot.backoff.next_delay()
        slot.failures_in_row += 1
        log.debug("uploader.attempt_failed", batch_id=batch.batch_id, uplink=slot.name,
                  attempt=batch.attempt, error=str(exc))
        if batch.attempt in (10, 100, 1000, 10000):  # long retries are visible, not silent
            log.warning("uploader.still_retrying", batch_id=batch.batch_id, uplink=slot.name,
                        attempt=batch.attempt, chunks=len(batch.items), error=str(exc))
        if slot.failures_in_row >= self.cfg.reconnect_after_failures and slot.connected:
            slot.connected = False
            try:
                await slot.uplink.close()
            except (TransportError, OSError) as close_exc:
                log.debug("uploader.close_failed", uplink=slot.name, error=str(close_exc))

    async def _throttled(self, slot: _Slot, batch: _Batch, retry_after_s: float) -> None:
        """Obey: wait retry-after (plus jitter, so a fleet does not return in step).
        Not a link failure: the breaker is told the link is alive."""
        await self._release(batch)
        now = self.clock.monotonic()
        wait = max(0.0, retry_after_s) * (1.0 + self.rng.uniform(0.0, self.cfg.throttle_jitter))
        slot.throttle_until = max(slot.throttle_until, now + wait)
        slot.throttle_hold_until = max(slot.throttle_hold_until, now + 2 * wait)
        slot.pace_s = min(_PACE_CAP_S, max(retry_after_s, slot.pace_s * 1.25))
        self._suspect.difference_update(batch.ids)  # the link carried it: not suspect
        self.counts["batches_throttled"] += 1
        slot.counts["throttled"] += 1
        slot.breaker.record_neutral(probe=batch.probe)
        # fewer requests in flight; batches keep their size: quotas count requests
        # (messages/s), so smaller batches would only mean more of them
        self.aimd.decrease_inflight()
        self._event("throttled", uplink=slot.name, retry_after_s=retry_after_s)

    async def _rejected(self, slot: _Slot, batch: _Batch, reason: str,
                        dead_lettered: bool = False) -> None:
        """The cloud refused the batch.

        A refusal caused by configuration or identity (:data:`CONFIG_REJECTIONS`), or one
        the cloud did not keep in its dead letters, is not the data's fault: the data
        stays, the uplink's breaker opens and ``blocked`` makes the agent unhealthy with
        the reason. Otherwise the chunks are resent one by one to find the bad one; a
        chunk refused on its own, and kept in the cloud's dead letters, is let go.
        """
        self.counts["batches_rejected"] += 1
        slot.counts["rejected"] += 1
        if not batch.items and not batch.gap_ids:  # a sync ping: nothing to lose
            slot.breaker.record_neutral(probe=batch.probe)
            log.warning("uploader.sync_ping_refused", uplink=slot.name, reason=reason)
            if self.clock_fix is not None:
                self.clock_fix.answered_without_sample()
            return
        if reason in CONFIG_REJECTIONS or not dead_lettered:
            await self._release(batch, failed=False)
            slot.breaker.trip(self.clock.monotonic(), probe=batch.probe)
            if self.blocked.get(slot.name) != reason:
                log.error("uploader.blocked", uplink=slot.name, reason=reason,
                          dead_lettered=dead_lettered, batch_id=batch.batch_id,
                          hint="the cloud refuses this device's batches for a reason a "
                          "resend cannot fix; the data stays buffered until it is fixed")
            self.blocked[slot.name] = reason
            self._event("blocked", uplink=slot.name, reason=reason)
            return
        slot.breaker.record_neutral(probe=batch.probe)
        if len(batch.items) > 1 or batch.gap_ids:
            self._isolate.update(batch.ids)
            await self._release(batch)
            return
        # the cloud holds the payload in its dead letters: the device may let go
        await self._dead_letter(batch.items, f"rejected:{reason}", in_cloud=True)

    async def _clock_refused_batch(self, slot: _Slot, batch: _Batch, reason: str) -> None:
        """The cloud refused readings stamped without a clock model (far ahead of its
        clock). Not the data's fault and nothing is dead-lettered: keep the chunks, mark
        them to be sent again with mapped times (the answer was a clock sample), back
        off so that a cloud that keeps refusing is not hammered."""
        await self._release(batch, failed=False)
        self._clock_refused.update(batch.ids)
        if len(self._clock_refused) > _ATTEMPTS_CAP:
            self._clock_refused.clear()  # a hint: a refused chunk comes back refused again
        self.counts["clock_rejections"] += 1
        slot.counts["rejected"] += 1
        slot.breaker.record_neutral(probe=batch.probe)
        slot.retry_at = self.clock.monotonic() + slot.backoff.next_delay()
        log.warning("uploader.clock_rejected", uplink=slot.name, reason=reason,
                    batch_id=batch.batch_id, chunks=len(batch.items))
        self._event("clock_rejected", uplink=slot.name, reason=reason)

    async def _dead_letter(self, items: Sequence[StoredChunkLike], reason: str, *,
                           in_cloud: bool = False) -> None:
        """Let go of chunks that will never be delivered. ``in_cloud``: the cloud keeps
        them in its dead letters (plain delete); else they leave a gap record."""
        n = sum(i.chunk.count for i in items)
        log.warning("uploader.dead_letter", device=self.device_id, chunks=len(items),
                    readings=n, reason=reason)
        if self.on_dead_letter is not None:
            res = self.on_dead_letter(items, reason)
            if res is not None:
                await res
        give_up = getattr(self.buffer, "give_up", None)
        if in_cloud:
            await self.buffer.ack([i.id for i in items])
            self.counts["readings_dead_lettered_in_cloud"] += n
        elif give_up is not None:  # leaves a gap record in the same transaction
            self.counts["readings_given_up"] += await give_up([i.id for i in items], reason)
        else:
            await self.buffer.ack([i.id for i in items])
        key = reason.split(":", 1)[0]
        self.dead_letters[key] += len(items)
        self.counts["readings_dead_lettered"] += n
        for i in items:
            self._attempts.pop(i.id, None)
            self._isolate.discard(i.id)
            self._suspect.discard(i.id)
        self._event("dead_letter", reason=reason, chunks=len(items), readings=n)

    # ------------------------------------------------------------------ waiting
    async def _wait(self, data: Awaitable[Any] | None, *,
                    deadline: float | None = None) -> str:
        """Sleep until data (if given), the deadline, a wake-up (in-flight completion,
        stop, drain) or a power-state change; returns which one ended it.

        Data that is already there returns ``"ready"`` without counting a wake-up.
        """
        if self._wake.is_set():  # something already happened: re-decide, no sleep taken
            if data is not None and asyncio.iscoroutine(data):
                data.close()
            return "wake"
        tasks: dict[asyncio.Future[Any], str] = {}
        if data is not None:
            dt = asyncio.ensure_future(data)
            await asyncio.sleep(0)
            if dt.done():
                dt.result()
                return "ready"
            tasks[dt] = "data"
        if self.power.path is not None:
            deadline = self._next_power_check if deadline is None else min(
                deadline, self._next_power_check)
        if deadline is not None and math.isfinite(deadline):
            tasks[asyncio.ensure_future(self.clock.sleep_until(deadline))] = "deadline"
        idle = not self._inflight  # a wake-up from idle is what costs a device energy
        tasks[asyncio.ensure_future(self._wake.wait())] = "wake"
        tasks[asyncio.ensure_future(self.power.wait_changed())] = "power"
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self.counts["loop_wakeups"] += 1
        if idle:
            self.counts["wakeups"] += 1
        kinds = {tasks[t] for t in done}
        return "data" if "data" in kinds else next(iter(kinds))

    async def _race(self, *aws: Awaitable[Any]) -> None:
        tasks = [asyncio.ensure_future(a) for a in aws]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _settle(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run an outcome's buffer bookkeeping (ack/release) to completion even if the
        send task is cancelled: a lost release would strand chunks in flight."""
        task = asyncio.create_task(coro)
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        return task

    async def _cancel_inflight(self) -> None:
        tasks = list(self._inflight)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        while self._settling:
            await asyncio.gather(*list(self._settling), return_exceptions=True)

    # ------------------------------------------------------------------ events
    def _breaker_changed(self, name: str, old: BreakerState, new: BreakerState) -> None:
        self.counts[f"breaker_{new.value}"] += 1
        self._wake.set()
        self._event("breaker", uplink=name, old=old.value, new=new.value)

    def _event(self, name: str, **fields: Any) -> None:
        if self.on_event is not None:
            self.on_event(name, fields)
