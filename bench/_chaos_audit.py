"""The chaos run's ground truth and its per-sequence-number audit.

Two independent records meet here:

- **what the harness produced**: every reading it published to a device's source, by
  natural key ``(device, sensor, value)`` (values are unique per device id, so the key
  survives clock jumps and time correction), also appended to ``produced.csv``;
- **what each agent numbered**: per agent buffer, the stream identity and the committed
  sequence high-water mark, read from the buffer file itself after the agent stopped
  (``meta`` instance / ``base:<device>`` and the ``seqs`` table: what
  ``DurableBuffer.stream_of`` answers), not from anything the cloud was told.

:func:`audit` walks every ``(device, instance, seq)`` of ``[seq_base, hwm]`` and classifies
it as stored exactly once, stored more than once (a duplicate), named by a gap record the
cloud keeps (by the gap's reason: "evicted" only where a gap names that very seq), or
**unexplained**. A gap that only gives a range (no exact runs: an unreadable chunk)
explains what nothing exact does, as the ledger does. It then checks content (every
stored reading is one the harness produced, with its timestamp) and that its own figures
agree with the cloud's completeness ledger (``pymigrate cloud completeness --json``) and
with ``SELECT COUNT(*)`` of the store.
"""

from __future__ import annotations

import bisect
import collections
import csv
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import msgspec

Key = tuple[str, str, float]
Runs = list[tuple[int, int]]

PRIORITY_NAMES = ("critical", "high", "normal", "low")
_runs_dec = msgspec.msgpack.Decoder(list[tuple[int, int]])


def key(device: str, sensor: str, value: float) -> Key:
    return (device, sensor, round(float(value), 6))


@dataclass
class Truth:
    """What the sources were given: natural key -> (priority name, publish time ms)."""

    produced: dict[Key, tuple[str, int]] = field(default_factory=dict)
    corrupted: set[Key] = field(default_factory=set)  # keys inside chunks the harness damaged
    csv_file: IO[str] | None = None

    def open_csv(self, path: Path) -> None:
        self.csv_file = open(path, "w", newline="")  # noqa: SIM115 - closed by close()
        self.csv_file.write("device,sensor,value,priority,t_ms\n")

    def add(self, device: str, sensor: str, value: float, priority: str, t_ms: int) -> None:
        k = key(device, sensor, value)
        self.produced[k] = (priority, t_ms)
        if self.csv_file is not None:
            self.csv_file.write(f"{device},{sensor},{k[2]!r},{priority},{t_ms}\n")

    def close(self) -> None:
        if self.csv_file is not None:
            self.csv_file.close()
            self.csv_file = None

    @classmethod
    def from_csv(cls, path: Path) -> Truth:
        t = cls()
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                t.add(row["device"], row["sensor"], float(row["value"]), row["priority"],
                      int(row["t_ms"]))
        return t


@dataclass(frozen=True)
class StreamTruth:
    """One agent buffer's numbering of one device, read from the buffer file."""

    device_id: str
    instance: str
    seq_base: int
    hwm: int
    agent: str  # the harness's name for the agent process (data dir)
    buffered: tuple[tuple[int, int], ...] = ()  # seqs still on the device (chunks, staging)


def read_buffer_streams(buffer_path: Path, agent: str) -> list[StreamTruth]:
    """Every device stream a stopped agent's buffer numbered: (instance, base, hwm)."""
    if not buffer_path.exists():
        return []
    con = sqlite3.connect(f"file:{buffer_path}?mode=ro", uri=True, timeout=10)
    try:
        meta = {str(k): v for k, v in con.execute("SELECT key, value FROM meta")}
        seqs = list(con.execute("SELECT device_id, next_seq FROM seqs"))
        left = _buffered_seqs(con)
    finally:
        con.close()
    inst = meta.get("instance", "")
    inst = inst.decode() if isinstance(inst, bytes) else str(inst)
    out = []
    for dev, nxt in seqs:
        base = meta.get(f"base:{dev}", 1)
        out.append(StreamTruth(str(dev), inst, int(base), int(nxt) - 1, agent,
                               tuple(_runs_of(left.get(str(dev), ())))))
    return out


def _buffered_seqs(con: sqlite3.Connection) -> dict[str, set[int]]:
    """Sequence numbers a stopped buffer still holds (not delivered, not given up)."""
    from agent.buffer.evict import chunk_of
    from agent.codec import open_chunk
    from agent.codec.base import codec_by_id
    from pymigrate.types import Priority

    out: dict[str, set[int]] = collections.defaultdict(set)
    for row in con.execute("SELECT device_id, priority, seq_first, seq_last, count, "
                           "ts_first, ts_last, codec, payload, checksum FROM chunks"):
        try:
            out[str(row[0])].update(r.seq for r in open_chunk(chunk_of(row)))
        except Exception:  # undecodable: its range is what is known
            out[str(row[0])].update(range(int(row[2]), int(row[3]) + 1))
    for dev, prio, codec, payload in con.execute(
            "SELECT device_id, priority, codec, payload FROM staging"):
        try:
            out[str(dev)].update(r.seq for r in codec_by_id(int(codec)).decode(
                bytes(payload), str(dev), Priority(int(prio))))
        except Exception:  # an unreadable staged blob names no seqs
            continue
    # gap records not yet acked by the cloud: the device still holds the explanation
    for dev, a, b, blob in con.execute("SELECT device_id, seq_first, seq_last, runs FROM gaps"):
        runs = [tuple(x) for x in _runs_dec.decode(blob)] if blob else [(a, b)]
        for lo, hi in runs:
            out[str(dev)].update(range(int(lo), int(hi) + 1))
    return out


# -- runs ------------------------------------------------------------------------------
def _runs_of(seqs: Iterable[int]) -> Runs:
    runs: Runs = []
    for s in sorted(set(seqs)):
        if runs and s == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], s)
        else:
            runs.append((s, s))
    return runs


class _RunSet:
    def __init__(self, runs: Iterable[tuple[int, int]]) -> None:
        self.runs = sorted(runs)

    def __contains__(self, s: int) -> bool:
        i = bisect.bisect_right(self.runs, (s, 2**63)) - 1
        return i >= 0 and self.runs[i][0] <= s <= self.runs[i][1]


@dataclass
class GapRec:
    seq_first: int
    seq_last: int
    reason: str
    runs: Runs  # empty: the range only (an unreadable chunk)


@dataclass
class Store:
    """What the cloud holds, read straight from its SQLite file."""

    rows: list[tuple[str, str, int, str, float, int]]  # device, instance, seq, sensor, value, ts
    gaps: dict[tuple[str, str], list[GapRec]]
    conflicts: dict[tuple[str, str], int]
    count_star: int
    dead_letters: collections.Counter[str]


def read_store(path: Path) -> Store:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        rows = [(str(d), str(i), int(s), str(n), float(v) if v is not None else float("nan"),
                 int(t)) for d, i, s, n, v, t in con.execute(
                     "SELECT device_id, instance, seq, sensor, value, ts_ms FROM readings")]
        gaps: dict[tuple[str, str], list[GapRec]] = collections.defaultdict(list)
        for d, i, a, b, reason, blob in con.execute(
                "SELECT device_id, instance, seq_first, seq_last, reason, runs FROM gaps"):
            runs = [tuple(x) for x in _runs_dec.decode(blob)] if blob else []
            gaps[(str(d), str(i))].append(GapRec(int(a), int(b), str(reason), runs))  # type: ignore[arg-type]
        conflicts = {(str(d), str(i)): int(n) for d, i, n in con.execute(
            "SELECT device_id, instance, sum(count) FROM conflicts GROUP BY 1, 2")}
        count_star = int(con.execute("SELECT COUNT(*) FROM readings").fetchone()[0])
        dl = collections.Counter(str(r) for (r,) in con.execute(
            "SELECT reason FROM dead_letters"))
    finally:
        con.close()
    return Store(rows, dict(gaps), conflicts, count_star, dl)


# -- the join ----------------------------------------------------------------------------
def audit(truth: Truth, streams: list[StreamTruth], store: Store,
          ledger: dict[str, Any] | None) -> dict[str, Any]:
    """Account every (device, instance, seq) the agents issued; see the module doc."""
    by_stream: dict[tuple[str, str], collections.Counter[int]] = collections.defaultdict(
        collections.Counter)
    content: collections.Counter[Key] = collections.Counter()
    ts_err: list[int] = []
    unknown = 0
    for dev, inst, seq, sensor, value, ts in store.rows:
        by_stream[(dev, inst)][seq] += 1
        k = key(dev, sensor, value)
        content[k] += 1
        if k not in truth.produced:
            unknown += 1
        elif content[k] == 1 and not sensor.startswith("bulk"):
            # (bursts are stamped when the agent takes them, seconds after publishing)
            ts_err.append(abs(ts - truth.produced[k][1]))
    known = {(s.device_id, s.instance): s for s in streams}
    keys = sorted(set(known) | set(by_stream) | set(store.gaps))
    gaps_by_reason: collections.Counter[str] = collections.Counter()
    per_stream: list[dict[str, Any]] = []
    tot = collections.Counter[str]()
    for sk in keys:
        st = known.get(sk)
        seen = by_stream.get(sk, collections.Counter())
        grs = store.gaps.get(sk, [])
        base = st.seq_base if st else min([*seen, *(g.seq_first for g in grs)] or [1])
        hwm = st.hwm if st else max([*seen, *(g.seq_last for g in grs)] or [0])
        exact = [(g.reason, _RunSet(g.runs)) for g in grs if g.runs]
        ranged = [(g.reason, _RunSet([(g.seq_first, g.seq_last)])) for g in grs if not g.runs]
        left = _RunSet(st.buffered if st else ())
        stored = dups = unexplained = buffered = 0
        reasons: collections.Counter[str] = collections.Counter()
        missing: list[int] = []
        for s in range(base, hwm + 1):
            n = seen.get(s, 0)
            if n:
                stored += 1
                dups += n - 1
                continue
            why = next((r for r, rs in exact if s in rs), None) or next(
                (r for r, rs in ranged if s in rs), None)
            if why is None and s in left:
                buffered += 1  # not delivered after the drain, but still on the device
            elif why is None:
                unexplained += 1
                missing.append(s)
            else:
                reasons[why] += 1
        beyond = sum(n for s, n in seen.items() if s > hwm or s < base)
        gaps_by_reason.update(reasons)
        tot.update(stored=stored, duplicates=dups, unexplained=unexplained, buffered=buffered,
                   beyond_hwm=beyond, issued=max(0, hwm - base + 1))
        per_stream.append({
            "device_id": sk[0], "instance": sk[1], "agent": st.agent if st else None,
            "seq_base": base, "hwm": hwm, "stored": stored, "duplicates": dups,
            "gaps": dict(reasons), "unexplained": unexplained, "still_buffered": buffered,
            "unexplained_runs": _runs_of(missing)[:10], "beyond_hwm": beyond,
            "conflicts": store.conflicts.get(sk, 0), "known_to_harness": st is not None})
    # produced readings: stored (by content), or not, per device
    produced_by_dev = collections.Counter(k[0] for k in truth.produced)
    stored_by_dev = collections.Counter(k[0] for k in content if k in truth.produced)
    issued_by_dev = collections.Counter[str]()
    for p in per_stream:
        issued_by_dev[p["device_id"]] += p["hwm"] - p["seq_base"] + 1
    content_dups = sum(n - 1 for n in content.values() if n > 1)
    dups_by_dev = collections.Counter[str]()
    for k, n in content.items():
        if n > 1:
            dups_by_dev[k[0]] += n - 1
    # numbered once per reading: issued = produced - never numbered + numbered twice
    accepted_by_dev = {d: issued_by_dev[d] - dups_by_dev[d] for d in issued_by_dev}
    ts_err.sort()

    def pct(p: float) -> int | None:
        return ts_err[min(len(ts_err) - 1, int(p * len(ts_err)))] if ts_err else None

    res: dict[str, Any] = {
        "produced": len(truth.produced),
        "issued_seqs": tot["issued"],
        "stored_rows": len(store.rows),
        "store_count_star": store.count_star,
        "stored_once": tot["stored"],
        "duplicates": tot["duplicates"],
        "content_duplicates": content_dups,
        "unexplained": tot["unexplained"],
        "still_buffered": tot["buffered"],
        "gaps_by_reason": dict(sorted(gaps_by_reason.items())),
        "conflicts": sum(store.conflicts.values()),
        "beyond_hwm": tot["beyond_hwm"],
        "unknown_in_store": unknown,
        "produced_not_stored": sum(produced_by_dev.values()) - sum(stored_by_dev.values()),
        # readings the harness produced that no agent ever numbered (never accepted)
        "never_numbered": sum(max(0, produced_by_dev[d] - accepted_by_dev.get(d, 0))
                              for d in produced_by_dev),
        "numbered_not_produced": sum(max(0, accepted_by_dev[d] - produced_by_dev[d])
                                     for d in accepted_by_dev),
        "corrupted_by_harness": len(truth.corrupted),
        # damaged on the device after a copy had already reached the cloud (ack lost)
        "corrupted_but_stored": sum(1 for k in truth.corrupted if content[k]),
        "dead_letters": dict(store.dead_letters),
        "streams": len(per_stream),
        "ts_abs_error_ms": {"p50": pct(0.5), "p99": pct(0.99),
                            "max": ts_err[-1] if ts_err else None,
                            "over_5s": sum(1 for e in ts_err if e > 5000),
                            "over_1h": sum(1 for e in ts_err if e > 3_600_000)},
        "per_stream": per_stream,
    }
    res["ledger"] = compare_ledger(per_stream, ledger, store.count_star)
    return res


def compare_ledger(per_stream: list[dict[str, Any]], ledger: dict[str, Any] | None,
                   count_star: int) -> dict[str, Any]:
    """The cloud ledger's figures beside ours, stream by stream; ``agrees`` when equal."""
    if ledger is None:
        return {"agrees": False, "error": "no ledger report"}
    theirs: dict[tuple[str, str], dict[str, Any]] = {}
    for d in ledger.get("devices", []):
        for s in d.get("streams", []):
            theirs[(d["device_id"], s["instance"])] = s
    diffs: list[dict[str, Any]] = []
    for p in per_stream:
        s = theirs.pop((p["device_id"], p["instance"]), None)
        mine = {"max_seq": p["hwm"], "stored": p["stored"],
                "unexplained": p["unexplained"] + p["still_buffered"],
                "gaps": {k: v for k, v in p["gaps"].items() if v}}
        if s is None:
            diffs.append({"stream": [p["device_id"], p["instance"]], "ours": mine,
                          "ledger": None})
            continue
        got = {"max_seq": s["max_seq"], "stored": s["stored"], "unexplained": s["unexplained"],
               "gaps": {k: v for k, v in s["gaps"].items() if v}}
        if got != mine:
            diffs.append({"stream": [p["device_id"], p["instance"]], "ours": mine,
                          "ledger": got})
    for (dev, inst), s in theirs.items():
        diffs.append({"stream": [dev, inst], "ours": None, "ledger": s})
    totals = ledger.get("totals", {})
    return {"agrees": not diffs and totals.get("stored") == count_star,
            "totals": totals, "stored_vs_count_star": [totals.get("stored"), count_star],
            "differences": diffs[:20]}
