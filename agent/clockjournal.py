"""The clock journal: readings stamped without a clock model still reach the cloud with
true time, across restarts, RTC jumps and reboots.

::

    ingest (TimeCorrector.correct) --note_stamped/note_stored--> journal <--on_sample-- acks
                                                                    |
    uploader: holding()? ping and wait : restamp(chunks) -> batch --+--> buffer state "clock"

Why
    A time handed out without a model is the RTC's (``m + base``, see
    :meth:`agent.timesync.TimeCorrector.unsynced_base`). After a restart with the RTC
    8 days ahead and no link, every reading would carry +8 days: the cloud refuses them.

What is kept (in the buffer's ``state`` table, key ``clock``)
    - the model's samples with the boot id of the monotonic clock they are on: the next
      process of the same boot imports them and corrects from its first reading;
    - one *session* per agent run: its boot, ``base``, monotonic and buffer-clock time at
      start and the first sequence number per device. The session's readings are those
      numbered from there to the next session's first number.

How unsynced readings are mapped
    The uploader holds chunks while a session stamped readings without a model and no
    model exists yet (it sends sync pings at once instead). When the model comes, each
    such session is given a frozen *fix* (written to the buffer before any chunk is sent
    with it, so a resend carries the same times and the cloud never sees a conflict):

    - same boot: ``m = ts - base`` is on this monotonic clock; true time is the model at
      ``m`` (exact up to the model's uncertainty). A change within ``slew_max_ms`` keeps
      the stamps (the corrector slews such a change in the same way);
    - another boot: ``m`` is moved onto this boot through the buffer clock (monotonic
      time accumulated across runs). That clock stops while the device is off, so the
      mapped time is the latest the reading can have been taken: stamps of a plausible
      RTC that lie between the true time earlier runs knew and that bound are kept;
      others (a jump ahead, or behind what was already seen) are mapped and flagged
      ``TIME_ANCHORED | TIME_UNCERTAIN`` with ``uncert_ms`` 0 (the time off is unknown).

    Chunks are re-encoded with the mapped times when they are packed (the stored chunk
    keeps the device's times; the mapping is deterministic). Readings that had a model
    when stamped (``TIME_CORRECTED``) are never touched.

Bounded
    The hold ends once ``hold_answers`` exchanges were answered without giving a usable
    sample (e.g. round trips over ``max_delay_ms``). Then a session's readings go as
    stamped (the session is marked ``raw`` first, durably); the cloud refuses a reading
    that is far ahead and was not corrected as ``clock_unsynced`` (retriable, nothing
    dead-lettered): the uploader takes the answer's server times as a sample, and such a
    refused chunk is sent again mapped by the raw session's frozen fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import msgspec
import structlog

from agent.buffer.types import StoredChunk
from agent.codec import codec_by_id, open_chunk, seal_chunk
from agent.retry.state import StoredChunkLike
from agent.timesync import StampMap, TimeCorrector
from pymigrate.clock import Clock, boot_id_of
from pymigrate.errors import PyMigrateError
from pymigrate.types import Chunk, Quality, Reading

__all__ = ["ClockJournal", "Fix", "Session"]

log = structlog.get_logger("agent.clockjournal")

STATE_KEY = "clock"
MAX_SESSIONS = 32  # sessions with unsynced readings kept (the oldest go first)
_CORRECTED = int(Quality.TIME_CORRECTED)
_ANCHORED = int(Quality.TIME_ANCHORED)
_UNCERTAIN = int(Quality.TIME_UNCERTAIN)
_TIME_FLAGS = _CORRECTED | _ANCHORED | _UNCERTAIN
_SAVE_EVERY_S = 30.0


class Fix(msgspec.Struct, frozen=True):
    """How a session's unsynced times map to true time, frozen once chosen.

    ``map`` None: no model yet (only with ``raw``). ``keep``: the model agrees with
    the stamps within the slew limit, they stay. ``other_boot``: mapped through the
    buffer clock. ``raw``: the session's readings were sent as stamped before a model
    existed; only a chunk the cloud refused as ``clock_unsynced`` is mapped."""

    map: StampMap | None
    keep: bool = False
    other_boot: bool = False
    raw: bool = False


class Session(msgspec.Struct):
    """One agent run, as far as its clock goes (see the module docstring)."""

    sid: int
    boot: str
    base: float
    m0: float
    age0: int
    seq0: dict[str, int]
    unsynced: bool = False
    end: dict[str, int] = msgspec.field(default_factory=dict)  # unsynced range end, excl.
    fix: Fix | None = None
    floor: int = 0  # the latest true time known before this run began (0: none)


class _State(msgspec.Struct):
    boot: str = ""
    samples: list[tuple[float, float, float]] = msgspec.field(default_factory=list)
    sessions: list[Session] = msgspec.field(default_factory=list)
    seen: int = 0  # the latest true time any run knew (its model's time)


class JournalBuffer(Protocol):
    """What the journal needs of the durable buffer."""

    async def get_state(self, key: str) -> bytes | None: ...

    async def put_state(self, key: str, value: bytes, *, urgent: bool = False) -> None: ...

    def stage_state(self, key: str, value: bytes) -> None: ...

    def age_ms(self) -> int: ...

    def next_seqs(self) -> dict[str, int]: ...


class ClockJournal:
    """Sessions and samples in the buffer; hold and restamp for the uploader."""

    def __init__(self, corrector: TimeCorrector, buffer: JournalBuffer, *, clock: Clock,
                 hold_answers: int = 3) -> None:
        self.corrector = corrector
        self.buffer = buffer
        self.clock = clock
        self.hold_answers = hold_answers
        self.boot = boot_id_of(clock) or ""
        self.sessions: list[Session] = []
        self._answers = 0  # exchanges answered while unsynced (bounds the hold)
        self._unsaved_fix = False
        self._saved_at = -1e18
        self._seen = 0
        self.counts = {"readings_restamped": 0, "chunks_restamped": 0, "sessions_fixed": 0,
                       "sessions_raw": 0, "samples_imported": 0}

    @property
    def current(self) -> Session:
        return self.sessions[-1]

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Load the journal, import this boot's samples, open this run's session and make
        it durable before any reading of the run is."""
        blob = await self.buffer.get_state(STATE_KEY)
        st = _State()
        if blob:
            try:
                st = msgspec.msgpack.decode(blob, type=_State)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.error("clock.journal_unreadable", error=str(exc))
        if self.boot and st.boot == self.boot and st.samples:
            n = self.corrector.import_samples(st.samples)
            self.counts["samples_imported"] = n
            log.info("clock.samples_imported", samples=n, synced=self.corrector.synced())
        self.sessions = st.sessions
        self._seen = st.seen
        seq0 = self.buffer.next_seqs()
        if self.sessions:  # the previous run's unsynced range ends where this one begins
            prev = self.sessions[-1]
            for dev, n in seq0.items():
                prev.end.setdefault(dev, n)
        self.sessions.append(Session(
            sid=(self.sessions[-1].sid + 1) if self.sessions else 1, boot=self.boot,
            base=self.corrector.unsynced_base() or 0.0, m0=self.clock.monotonic() * 1000.0,
            age0=self.buffer.age_ms(), seq0=seq0, floor=st.seen))
        self._prune()
        self._freeze()
        await self.save()

    async def save(self) -> None:
        """Write the journal now (waits for its commit)."""
        await self.buffer.put_state(STATE_KEY, self._blob(), urgent=True)
        self._unsaved_fix = False
        self._saved_at = self.clock.monotonic()

    def _stage(self) -> None:
        """Write the journal with the next group commit (does not wait)."""
        self.buffer.stage_state(STATE_KEY, self._blob())
        self._saved_at = self.clock.monotonic()

    def _blob(self) -> bytes:
        cur = self.current
        if cur.unsynced and cur.fix is None:
            cur.base = self._base()
        if self.corrector.synced():
            self._seen = max(self._seen, self.corrector.now_ms())
        return msgspec.msgpack.encode(_State(self.boot, self.corrector.export_samples(),
                                             self.sessions, self._seen))

    def _base(self) -> float:
        # read lazily: the corrector reads the clocks first when it corrects a reading
        base = self.corrector.unsynced_base()
        return self.current.base if base is None else base

    def _prune(self) -> None:
        """Keep the current session and the sessions with unsynced readings (bounded)."""
        cur = self.sessions[-1]
        keep = [s for s in self.sessions[:-1] if s.unsynced]
        if len(keep) > MAX_SESSIONS:
            log.warning("clock.sessions_dropped", sessions=len(keep) - MAX_SESSIONS)
            keep = keep[-MAX_SESSIONS:]
        self.sessions = [*keep, cur]

    # ------------------------------------------------------------------ ingest side
    def note_stamped(self, readings: Sequence[Reading]) -> None:
        """After correction, before the readings are appended: a reading stamped without
        a model makes this session one to fix (staged to ride with those readings)."""
        cur = self.current
        if cur.unsynced or cur.fix is not None:
            return
        if any(r.quality & _UNCERTAIN and not r.quality & _CORRECTED for r in readings):
            cur.unsynced = True
            self._stage()

    def note_stored(self, accepted: Sequence[Reading]) -> None:
        """After an append: the first batch stamped with a model ends the session's
        unsynced range (later batches get higher sequence numbers)."""
        cur = self.current
        if not cur.unsynced or not accepted:
            return
        firsts: dict[str, int] = {}
        for r in accepted:
            if not r.quality & _CORRECTED:
                return
            firsts[r.device_id] = min(r.seq, firsts.get(r.device_id, r.seq))
        new = {d: s for d, s in firsts.items() if d not in cur.end}
        if new:
            cur.end.update(new)
            self._stage()

    # ------------------------------------------------------------------ samples
    def on_sample(self, accepted: bool) -> None:
        """After an ack's sample was offered to the corrector."""
        if not self.corrector.synced():
            if not accepted:
                self._answers += 1
            return
        if self._freeze():
            self._stage()
        elif self.clock.monotonic() - self._saved_at >= _SAVE_EVERY_S:
            self._stage()  # samples for the next run of this boot

    def answered_without_sample(self) -> None:
        """An answer that gave no sample (a sync ping the cloud refused): it counts
        towards the hold's bound."""
        if not self.corrector.synced():
            self._answers += 1

    def _freeze(self) -> bool:
        """Give every session waiting for a model its fix; True when one was given."""
        if not self.corrector.synced():
            return False
        cur = self.current
        done = False
        for s in self.sessions:
            if not s.unsynced or (s.fix is not None and s.fix.map is not None):
                continue
            raw = s.fix is not None and s.fix.raw
            if s is cur or (s.boot and s.boot == self.boot):
                base = self._base() if s is cur else s.base
                m = self.corrector.stamp_map(base)
                assert m is not None
                t_a = s.m0 + base
                nxt = self._next(s)
                t_b = (nxt.m0 if nxt is not None else self.clock.monotonic() * 1000.0) + base
                slew = self.corrector.config.slew_max_ms
                keep = all(abs(m.at(t) - t) <= slew for t in (t_a, t_b))
                fix = Fix(m, keep=keep and not raw, raw=raw)
            else:  # another boot: move its monotonic time onto ours by the buffer clock
                fix = self._other_boot_fix(s, raw)
            s.fix = fix
            done = True
            self._unsaved_fix = True
            self.counts["sessions_fixed"] += 1
            log.info("clock.session_fixed", session=s.sid, same_boot=not fix.other_boot,
                     keep=fix.keep, raw=raw,
                     shift_ms=None if fix.map is None else fix.map.at(s.m0 + s.base)
                     - (s.m0 + s.base))
        return done

    def _other_boot_fix(self, s: Session, raw: bool) -> Fix:
        """Map a run of another boot through the buffer clock, which stops while the
        device is off: its mapped time is the latest the true time can have been. The
        stamps are kept when the RTC was plausible and they lie between what the
        earlier runs knew (``floor``) and that latest time: an RTC that was right stays
        right; one ahead (a forward jump) or behind what was already seen is mapped."""
        cur = self.current
        shift = (cur.m0 - cur.age0) - (s.m0 - s.age0)
        m = self.corrector.stamp_map(s.base, shift)
        assert m is not None
        nxt = self._next(s)
        t_a = s.m0 + s.base
        t_b = s.m0 + ((nxt.age0 if nxt is not None else cur.age0) - s.age0) + s.base
        slew = self.corrector.config.slew_max_ms
        ok = (self.corrector.plausible(t_a) and self.corrector.plausible(t_b)
              and t_a >= s.floor - slew and t_b <= m.at(t_b) + slew)
        return Fix(m, keep=ok and not raw, other_boot=True, raw=raw)

    def _next(self, s: Session) -> Session | None:
        i = self.sessions.index(s)
        return self.sessions[i + 1] if i + 1 < len(self.sessions) else None

    # ------------------------------------------------------------------ uploader side
    def holding(self) -> bool:
        """True while readings stamped without a model wait for one (bounded by
        ``hold_answers`` answered exchanges that gave no model)."""
        if self.corrector.synced() or self._answers >= self.hold_answers:
            return False
        return any(s.unsynced and s.fix is None for s in self.sessions)

    async def restamp(self, items: list[StoredChunkLike],
                      refused: set[int] | frozenset[int] = frozenset()
                      ) -> list[StoredChunkLike]:
        """The chunks to send: those holding unsynced readings of a fixed session carry
        mapped times. ``refused``: chunk ids the cloud refused as ``clock_unsynced``."""
        waiting = [s for s in self.sessions if s.unsynced and s.fix is None]
        if waiting and not self.corrector.synced():
            # the hold gave up: these go as stamped; say so durably first, so that a
            # later model never maps what the cloud may already have stored
            for s in waiting:
                s.fix = Fix(None, raw=True)
                self.counts["sessions_raw"] += 1
                log.warning("clock.sent_unsynced", session=s.sid, answers=self._answers)
            self._unsaved_fix = True
        elif waiting:
            self._freeze()
        if self._unsaved_fix:
            await self.save()
        out: list[StoredChunkLike] = []
        for item in items:
            out.append(self._restamp_one(item, item.id in refused))
        return out

    def _candidate(self, s: Session, refused: bool) -> bool:
        fix = s.fix
        return (s.unsynced and fix is not None and fix.map is not None and not fix.keep
                and (refused or not fix.raw))

    def _owner(self, dev: str, seq: int) -> Session | None:
        """The run that numbered ``seq`` of ``dev``: the last whose first number is <= it
        (a device a run had not seen yet starts at 1)."""
        for s in reversed(self.sessions):
            if s.seq0.get(dev, 1) <= seq:
                return s
        return None

    def _may_need(self, chunk: Chunk, refused: bool) -> bool:
        """Cheap test on the sequence range: can the chunk hold readings to map?"""
        dev = chunk.device_id
        for i, s in enumerate(self.sessions):
            if not self._candidate(s, refused):
                continue
            nxt = self.sessions[i + 1].seq0.get(dev) if i + 1 < len(self.sessions) else None
            ends = [x for x in (nxt, None if refused else s.end.get(dev)) if x is not None]
            if s.seq0.get(dev, 1) <= chunk.seq_last and (
                    not ends or chunk.seq_first < min(ends)):
                return True
        return False

    def _restamp_one(self, item: StoredChunkLike, refused: bool) -> StoredChunkLike:
        if not self._may_need(item.chunk, refused):
            return item
        try:
            readings = open_chunk(item.chunk)
        except PyMigrateError:
            return item  # the buffer checked it; the cloud will say what it thinks
        out: list[Reading] = []
        changed = 0
        for r in readings:
            q = r.quality
            s = (self._owner(r.device_id, r.seq)
                 if q & _UNCERTAIN and not q & _CORRECTED else None)
            if s is None or not self._candidate(s, refused) or (
                    not refused and r.seq >= s.end.get(r.device_id, 2**63)):
                out.append(r)
                continue
            assert s.fix is not None and s.fix.map is not None
            m = s.fix.map
            if s.fix.other_boot:
                flags, uncert = _CORRECTED | _ANCHORED | _UNCERTAIN, 0
            else:
                flags, uncert = _CORRECTED | (q & _ANCHORED), m.uncert(r.ts_ms)
            out.append(msgspec.structs.replace(
                r, ts_ms=m.at(r.ts_ms), uncert_ms=uncert, quality=(q & ~_TIME_FLAGS) | flags,
                raw_ts_ms=r.ts_ms if r.raw_ts_ms is None else r.raw_ts_ms))
            changed += 1
        if not changed:
            return item
        chunk = seal_chunk(out, codec_by_id(item.chunk.codec))
        self.counts["readings_restamped"] += changed
        self.counts["chunks_restamped"] += 1
        # the same row (acked or released by its id), sent with the mapped times
        return StoredChunk(id=item.id, chunk=chunk, attempts=item.attempts,
                           created_ms=item.created_ms, age_ms=getattr(item, "age_ms", 0))

    def status(self) -> dict[str, object]:
        """For the health view: sessions waiting for a model, fixes, restamps."""
        return {"holding": self.holding(),
                "sessions_unsynced": sum(1 for s in self.sessions if s.unsynced),
                **self.counts}
