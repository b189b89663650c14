"""Smoke test of ``python -m bench transports`` (tiny bounds; CoAP needs no broker)."""

from __future__ import annotations

import json

import pytest

from bench.transports import main

pytestmark = pytest.mark.integration


def test_bench_transports_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["--only", "coap", "--devices", "1", "--readings", "40", "--seconds", "10",
               "--max-batches", "5"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["benchmark"] == "transports"
    for scenario in ("clean", "faults"):
        r = out["results"]["coap"][scenario]
        assert r["acked_batches"] == 5 and r["exactly_once"]
        assert r["wire_over_payload"] > 1.0  # headers and acks cost something
        assert 0 < r["payload_bytes_per_reading"] < 40
