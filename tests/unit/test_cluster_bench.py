"""The cluster benchmark's own audit catches what it claims to: a reading lost, stored
twice (same reading, or one sequence number twice), foreign or moved in time; and the
scaling model's arithmetic."""

from __future__ import annotations

import pytest

from bench._amqp_fleet import audit_rows
from bench.scaling import model


def test_audit_names_every_kind_of_error() -> None:
    produced = {("d", "s00", 1.0): 1000, ("d", "s01", 2.0): 1000, ("e", "s00", 1.0): 1000}
    clean = [("d", "s00", 1.0, 1000, 1), ("d", "s01", 2.0, 1000, 2), ("e", "s00", 1.0, 1000, 1)]
    assert audit_rows(produced, clean) == {"produced": 3, "stored_rows": 3, "lost": 0,
                                           "duplicated": 0, "foreign": 0, "ts_mismatch": 0}
    bad = [("d", "s00", 1.0, 1000, 1), ("d", "s00", 1.0, 1000, 7),  # stored twice
           ("d", "s01", 2.0, 999, 1),  # another timestamp, and seq 1 a second time
           ("x", "s00", 5.0, 1000, 1)]  # nobody produced it; ("e", ...) is lost
    got = audit_rows(produced, bad)
    assert (got["lost"], got["duplicated"], got["foreign"], got["ts_mismatch"]) == (1, 1, 1, 1)


def test_scaling_model_arithmetic() -> None:
    rows = model(decode_us=1.0, write_us=9.0, db_us=10.0, ack_us_batch=600.0,
                 broker_us_batch=3000.0)
    raw100k = next(r for r in rows if r["devices"] == 100_000 and r["data"] == "raw 1 Hz")
    assert raw100k["readings_per_s"] == 1_000_000 and raw100k["batches_per_s"] == 1667
    # 1M readings/s x 10 µs + 1,667 batches/s x 600 µs
    assert raw100k["ingest_cores"] == pytest.approx(11.0, abs=0.01)
    assert raw100k["db_server_cores"] == pytest.approx(10.0)
    assert raw100k["broker_cores"] == pytest.approx(5.0, abs=0.01)
    agg = next(r for r in rows if r["devices"] == 100_000 and r["data"] != "raw 1 Hz")
    assert agg["readings_per_s"] == round(1_000_000 * 4 / 600)
