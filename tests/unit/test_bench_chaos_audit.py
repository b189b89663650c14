"""The chaos audit's bookkeeping: lost vs duplicated vs evicted vs quarantined."""

from __future__ import annotations

import collections
import json
from pathlib import Path

from bench._chaos_audit import Truth, agent_log_events, audit


def _truth() -> Truth:
    t = Truth()
    for i in range(1, 11):
        t.add("d1", "s0", float(i), "normal", 1000 * i)
    for i in range(11, 16):
        t.add("d1", "bulk", i + 0.25, "low", 1000 * i)
    return t


def test_everything_stored_once_is_clean() -> None:
    t = _truth()
    stored = [("d1", s, v, t.produced[(d, s, v)][1] + 5) for (d, s, v) in t.produced]
    res = audit(t, stored, {})
    assert (res["lost"], res["duplicated"], res["unknown_in_store"]) == (0, 0, 0)
    assert res["ts_abs_error_ms"]["max"] == 5


def test_missing_split_into_quarantined_evicted_lost() -> None:
    t = _truth()
    t.quarantined.add(("d1", "s0", 3.0))
    keep = [k for k in t.produced if k not in {("d1", "s0", 3.0), ("d1", "s0", 4.0),
                                                ("d1", "bulk", 11.25), ("d1", "bulk", 12.25),
                                                ("d1", "bulk", 13.25)}]
    stored = [(d, s, v, 0) for (d, s, v) in keep] + [("d1", "s0", 1.0, 0), ("x", "y", 1.0, 0)]
    # the agent logged 2 LOW readings evicted: the third missing LOW one is lost
    res = audit(t, stored, {"d1": collections.Counter({"low": 2})})
    assert res["quarantined_readings"] == 1
    assert res["evicted_by_policy"] == {"low": 2}
    assert res["lost"] == 2 and res["lost_by_priority"] == {"normal": 1, "low": 1}
    assert res["duplicated"] == 1 and res["unknown_in_store"] == 1


def test_agent_log_events(tmp_path: Path) -> None:
    log = tmp_path / "agent.log"
    lines = [json.dumps({"event": "buffer.evicted", "priority": "low", "readings": 7}),
             json.dumps({"event": "buffer.evicted", "priority": "low", "readings": 3}),
             json.dumps({"event": "buffer.quarantined", "chunk_id": 4}),
             "not json", "{broken", json.dumps({"event": "reading rejected"})]
    log.write_text("\n".join(lines))
    ev = agent_log_events(log)
    assert ev["evicted"] == {"low": 10} and ev["quarantined"] == 1 and ev["rejected"] == 1
    assert agent_log_events(tmp_path / "nope.log")["quarantined"] == 0
