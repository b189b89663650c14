"""The clock journal on its own (virtual time, an in-memory stand-in for the buffer's
state table): what is held, how unsynced times are mapped, and that a mapping once used
is the one every later resend uses, across restarts."""

from __future__ import annotations

import msgspec

from agent.buffer.types import StoredChunk
from agent.clockjournal import STATE_KEY, ClockJournal
from agent.codec import open_chunk, seal_chunk
from agent.timesync import TimeCorrector, TimeSyncConfig
from pymigrate.clock import VirtualClock
from pymigrate.types import Quality, Reading

DEV = "d"
DAY_MS = 86_400_000


class StateBuffer:
    """The part of the durable buffer the journal uses, in memory."""

    def __init__(self, clock: VirtualClock) -> None:
        self.clock = clock
        self.state: dict[str, bytes] = {}  # committed
        self.staged: dict[str, bytes] = {}
        self.next = {DEV: 1}
        self.puts = 0

    async def get_state(self, key: str) -> bytes | None:
        return self.state.get(key)

    async def put_state(self, key: str, value: bytes, *, urgent: bool = False) -> None:
        self.state[key] = value
        self.puts += 1

    def stage_state(self, key: str, value: bytes) -> None:
        self.staged[key] = value

    def commit(self) -> None:
        self.state.update(self.staged)
        self.staged.clear()

    def age_ms(self) -> int:
        return int(self.clock.monotonic() * 1000)

    def next_seqs(self) -> dict[str, int]:
        return dict(self.next)


async def stamped(clock: VirtualClock, tc: TimeCorrector, journal: ClockJournal,
                  buf: StateBuffer, n: int) -> StoredChunk:
    """``n`` readings a second apart, corrected and numbered like the ingest stage does."""
    out = []
    for _ in range(n):
        (r,) = tc.correct([Reading(DEV, "t", clock.time_ms(), float(clock.true_time_ms()))])
        journal.note_stamped([r])
        seq = buf.next[DEV]
        buf.next[DEV] += 1
        out.append(msgspec.structs.replace(r, seq=seq))
        await clock.advance(1.0)
    journal.note_stored(out)
    return StoredChunk(id=seq, chunk=seal_chunk(out), attempts=0, created_ms=0)


def sample(clock: VirtualClock, tc: TimeCorrector) -> bool:
    """An ack answered at once by a server on true time."""
    t = clock.true_time_ms()
    return tc.add_sample(clock.time_ms(), t, t, clock.time_ms())


async def test_held_until_a_model_then_mapped_and_the_same_after_a_restart() -> None:
    clock = VirtualClock(wall_offset_ms=8 * DAY_MS)  # the RTC 8 days ahead, no link
    buf = StateBuffer(clock)
    tc = TimeCorrector(TimeSyncConfig(), clock=clock)
    journal = ClockJournal(tc, buf, clock=clock)
    await journal.start()
    assert not journal.holding()  # nothing stamped yet
    item = await stamped(clock, tc, journal, buf, 5)
    assert journal.holding()
    assert all(r.quality & Quality.TIME_UNCERTAIN and not r.quality & Quality.TIME_CORRECTED
               and r.ts_ms - r.value > 7 * DAY_MS for r in open_chunk(item.chunk))
    journal.on_sample(sample(clock, tc))
    assert not journal.holding()
    puts = buf.puts
    (sent,) = await journal.restamp([item])
    assert buf.puts == puts + 1  # the fix is durable before a chunk goes out with it
    got = open_chunk(sent.chunk)
    assert [r.seq for r in got] == [r.seq for r in open_chunk(item.chunk)]
    for r in got:
        assert abs(r.ts_ms - r.value) <= 2, r  # true time at stamping
        assert r.quality & Quality.TIME_CORRECTED and r.raw_ts_ms is not None
        assert r.raw_ts_ms - r.ts_ms > 7 * DAY_MS
    # a restart in the same boot: the model comes back, the frozen fix maps the same way
    buf.commit()
    tc2 = TimeCorrector(TimeSyncConfig(), clock=clock)
    j2 = ClockJournal(tc2, buf, clock=clock)
    await j2.start()
    assert tc2.synced() and not j2.holding()
    (again,) = await j2.restamp([item])
    assert again.chunk.checksum == sent.chunk.checksum  # a resend is the same content


async def test_hold_is_bounded_and_what_goes_unmapped_is_marked_first() -> None:
    clock = VirtualClock(wall_offset_ms=8 * DAY_MS)
    buf = StateBuffer(clock)
    tc = TimeCorrector(TimeSyncConfig(hold_answers=2), clock=clock)
    journal = ClockJournal(tc, buf, clock=clock, hold_answers=2)
    await journal.start()
    item = await stamped(clock, tc, journal, buf, 3)
    assert journal.holding()
    journal.answered_without_sample()
    journal.on_sample(False)  # an ack whose sample was refused
    assert not journal.holding()
    (sent,) = await journal.restamp([item])
    assert sent is item  # as stamped: no model to map with
    state = msgspec.msgpack.decode(buf.state[STATE_KEY])
    assert any(s["fix"] is not None and s["fix"]["raw"] for s in state["sessions"])
    # a model later maps only what the cloud refused as clock_unsynced
    journal.on_sample(sample(clock, tc))
    (still,) = await journal.restamp([item])
    assert still is item
    (refused,) = await journal.restamp([item], {item.id})
    assert all(abs(r.ts_ms - r.value) <= 2 for r in open_chunk(refused.chunk))


async def test_a_right_rtc_keeps_its_stamps_and_a_model_at_start_stamps_nothing_unsynced(
        ) -> None:
    clock = VirtualClock()
    buf = StateBuffer(clock)
    tc = TimeCorrector(TimeSyncConfig(), clock=clock)
    journal = ClockJournal(tc, buf, clock=clock)
    await journal.start()
    item = await stamped(clock, tc, journal, buf, 3)
    journal.on_sample(sample(clock, tc))
    (sent,) = await journal.restamp([item])
    assert sent is item  # within the slew limit: the stamps stay, nothing re-encoded
    buf.commit()
    tc2 = TimeCorrector(TimeSyncConfig(), clock=clock)
    j2 = ClockJournal(tc2, buf, clock=clock)
    await j2.start()
    later = await stamped(clock, tc2, j2, buf, 3)
    assert all(r.quality & Quality.TIME_CORRECTED for r in open_chunk(later.chunk))
    assert not j2.current.unsynced
