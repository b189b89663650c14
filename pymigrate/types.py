"""Shared core types: everyone imports these, nobody copies them."""

from __future__ import annotations

import enum

import msgspec


class Priority(enum.IntEnum):
    """Delivery and eviction class. Lower value = more important (sent first, evicted last)."""

    CRITICAL = 0
    HIGH = 1
    NORMAL = 2
    LOW = 3

    @classmethod
    def parse(cls, value: str | int | Priority) -> Priority:
        if isinstance(value, Priority):
            return value
        if isinstance(value, int):
            return cls(value)
        try:
            return cls[str(value).upper()]
        except KeyError:
            raise ValueError(
                f"unknown priority {value!r} (expected one of "
                f"{', '.join(p.name.lower() for p in cls)})"
            ) from None


class Quality(enum.IntFlag):
    """Per-reading quality flags (travel through the codec as an integer column)."""

    NONE = 0
    TIME_CORRECTED = 1  # timestamp corrected by the clock model
    TIME_ANCHORED = 2  # device RTC untrusted: time derived from monotonic anchoring
    TIME_UNCERTAIN = 4  # no good sync yet
    LATE = 8  # arrived after the allowed lateness of its window
    AGGREGATE = 16  # value is an aggregate (see AggInfo)
    SENSOR_FAULT = 32  # source flagged the sensor as faulty


class AggInfo(msgspec.Struct, frozen=True, array_like=True):
    """Metadata of an aggregate reading: what rule and function produced it over which window."""

    rule: str
    fn: str
    window_end_ms: int
    count: int


class Reading(msgspec.Struct, frozen=True, gc=False):
    """One sensor sample.

    ``ts_ms`` is int64 milliseconds UTC (corrected); ``raw_ts_ms`` what the device said.
    ``seq`` is the per-device sequence number, 0 until the buffer accepts the reading.
    """

    device_id: str
    sensor: str
    ts_ms: int
    value: float
    priority: Priority = Priority.NORMAL
    seq: int = 0
    raw_ts_ms: int | None = None
    quality: int = 0
    uncert_ms: int = 0
    agg: AggInfo | None = None


class Chunk(msgspec.Struct, frozen=True):
    """A sealed, immutable run of readings of one device and priority, encoded by a codec.

    The unit of storage, upload, ack and eviction. ``checksum`` is CRC32 of ``payload``.
    """

    device_id: str
    priority: Priority
    seq_first: int
    seq_last: int
    count: int
    ts_first: int
    ts_last: int
    codec: int
    payload: bytes
    checksum: int


class Gap(msgspec.Struct, frozen=True, array_like=True):
    """Sequence numbers the agent will never deliver, and why (the completeness ledger).

    ``runs`` lists the exact sequence numbers as inclusive ranges. Empty ``runs`` (what
    could not be read any more, e.g. a corrupt database page) means: every sequence number
    of ``[seq_first, seq_last]`` that is not stored or named by another gap, at most
    ``count`` of them. ``ts_ms`` is the device's wall time when it gave them up.
    """

    seq_first: int
    seq_last: int
    count: int
    reason: str
    ts_ms: int
    runs: list[tuple[int, int]] = msgspec.field(default_factory=list)
    detail: str = ""

    @property
    def exact(self) -> bool:
        return bool(self.runs)


#: Rejection reasons caused by configuration or identity, not by the data: the device
#: keeps the data, opens its breaker and reports itself unhealthy.
CONFIG_REJECTIONS = frozenset({"device_mismatch", "unauthorized", "forbidden", "bad_version"})

#: Rejections of readings the device stamped without a clock model (far ahead of the
#: cloud's clock): retriable. The device keeps the data, takes the answer's server times
#: as a clock sample and sends the readings again with corrected times.
CLOCK_REJECTIONS = frozenset({"clock_unsynced"})


def seq_runs_of(seqs: list[int]) -> list[tuple[int, int]]:
    """Sorted inclusive runs of distinct sequence numbers."""
    runs: list[tuple[int, int]] = []
    for s in sorted(set(seqs)):
        if runs and s == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], s)
        else:
            runs.append((s, s))
    return runs


class Ack(msgspec.Struct, frozen=True):
    """End-to-end acknowledgement from the cloud ingest.

    ``t_recv_ms``/``t_send_ms`` are the server's receive and send times (NTP-style samples).
    ``status`` is ``ok``, ``duplicate`` (already stored, written once), ``conflict`` (some
    sequence numbers were already stored with other content: the new copy is kept apart,
    ``conflicts`` readings), ``rejected`` (non-retriable, ``reason`` says why;
    ``dead_lettered`` tells whether the cloud kept the payload, so the device may let go),
    ``throttled`` (retry after ``retry_after_s``) or ``error`` (retriable).
    ``count`` is how many readings the cloud decoded from the batch and ``gaps`` how many
    gap records it stored: an ack frees a batch only when both match what was sent.
    """

    batch_id: str
    status: str
    t_recv_ms: int
    t_send_ms: int
    accepted: int = 0
    duplicates: int = 0
    reason: str = ""
    retry_after_s: float = 0.0
    count: int = -1  # -1: not reported (transport-only acks, older clouds)
    gaps: int = 0
    conflicts: int = 0
    dead_lettered: bool = False
