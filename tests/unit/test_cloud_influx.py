"""InfluxDB store against an in-process fake HTTP server: the v2 write API, auth,
retry on 5xx/429 obeying Retry-After, refusal on 400, unreachable server, line format."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web

from cloud.stores.base import StoreRejected, StoreUnavailable
from cloud.stores.influx import InfluxStore, _retry_after, check_points, reading_lines
from pymigrate.types import AggInfo, Priority, Reading
from tests.conftest import free_port
from tests.unit.cloud_helpers import InstantClock, make_readings


class FakeInflux:
    """Records requests; answers from a script of (status, headers) then 204."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], dict[str, str], bytes]] = []
        self.script: list[tuple[int, dict[str, str]]] = []
        self.points: list[str] = []
        self.fail_writes_after: int | None = None  # writes answered 204, then 503s

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append((request.path, dict(request.query), dict(request.headers), body))
        if self.script:
            status, headers = self.script.pop(0)
            return web.Response(status=status, headers=headers, text='{"error":"scripted"}')
        if request.path == "/query":
            return web.json_response(self.query_answer(request.query.get("q", "")))
        if self.fail_writes_after is not None:
            if self.fail_writes_after <= 0:
                return web.Response(status=503, text='{"error":"overloaded"}')
            self.fail_writes_after -= 1
        self.points.extend(body.decode().splitlines())
        return web.Response(status=204)

    def query_answer(self, q: str) -> dict[str, Any]:
        if q.startswith("SELECT count"):  # every point ever sent (of the device asked for)
            m = re.search(r"\"device\" = '([^']*)'", q)
            n = sum(1 for p in self.points if m is None or f",device={m.group(1)}," in p)
            return {"results": [{"series": [{"name": "readings", "columns": ["time", "count"],
                                             "values": [[0, n]]}]}]}
        if q.startswith("SELECT *"):
            cols = ["time", "agg_count", "agg_fn", "agg_rule", "agg_window_end_ms", "device",
                    "priority", "quality", "raw_ts_ms", "sensor", "seq", "uncert_ms", "value"]
            return {"results": [{"series": [{"name": "readings", "columns": cols, "values": [
                [2_000_000_002, None, None, None, None, "d", 1, 0, None, "s", 2, 5, 1.5],
                [1_000_000_001, 60, "avg", "w", 1000, "d", 2, 16, 990, "s", 1, 0, 2.5]]}]}]}
        return {"results": [{"error": "unsupported"}]}


@contextlib.asynccontextmanager
async def serve_fake() -> AsyncIterator[tuple[FakeInflux, str]]:
    """A FakeInflux on a free loopback port: (the fake, its URL)."""
    f = FakeInflux()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", f.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeInflux, str]]:
    async with serve_fake() as served:
        yield served


async def _store(url: str, tmp: Path, **kw: Any) -> InfluxStore:
    s = InfluxStore(url, ledger_path=tmp / "l.db", clock=kw.pop("clock", InstantClock()), **kw)
    await s.open()
    return s


async def test_v2_write_api_token_and_precision(fake: tuple[FakeInflux, str],
                                                tmp_path: Path) -> None:
    f, url = fake
    s = await _store(url, tmp_path, version=2, org="acme", bucket="iot", token="t0k",
                     max_lines=4)
    try:
        res = await s.write("d", "b", make_readings("d", 10))
        assert res.written == 10
        writes = [r for r in f.requests if r[0] == "/api/v2/write"]
        assert len(writes) == 3  # 10 lines in requests of at most 4
        _, query, headers, _ = writes[0]
        assert query == {"org": "acme", "bucket": "iot", "precision": "ns"}
        assert headers["Authorization"] == "Token t0k"
        assert len(f.points) == 10
        again = await s.write("d", "b", make_readings("d", 10))
        assert again.written == 0 and again.duplicates == 10 and len(f.points) == 10
        got = await s.query("d", "s", 0, 5000)
        q = [r for r in f.requests if r[0] == "/query"][-1][1]
        assert q["db"] == "iot" and q["epoch"] == "ns"
        assert "\"sensor\" = 's'" in q["q"] and "time >= 0ms" in q["q"]
        assert "time < 5000ms" in q["q"]
        assert got[0] == Reading("d", "s", 1000, 2.5, Priority.NORMAL, 1, 990, 16, 0,
                                 AggInfo("w", "avg", 1000, 60))
        assert got[1].seq == 2 and got[1].agg is None and got[1].uncert_ms == 5
        assert await s.count("d") == 10
    finally:
        await s.close()


async def test_v1_basic_auth_and_create_database(fake: tuple[FakeInflux, str],
                                                 tmp_path: Path) -> None:
    f, url = fake
    s = await _store(url, tmp_path, db="x", rp="week", username="u", password="p")
    try:
        assert f.requests[0][0] == "/query" and "CREATE DATABASE" in f.requests[0][1]["q"]
        await s.write("d", "b", make_readings("d", 2))
        _, query, headers, _ = f.requests[-1]
        assert query == {"db": "x", "precision": "ns", "rp": "week", "u": "u", "p": "p"}
        assert "Authorization" not in headers
    finally:
        await s.close()


async def test_retries_5xx_and_429_with_retry_after(fake: tuple[FakeInflux, str],
                                                    tmp_path: Path) -> None:
    f, url = fake
    clock = InstantClock()
    s = await _store(url, tmp_path, clock=clock, backoff_s=0.1, max_retries=3)
    try:
        f.script = [(503, {}), (429, {"Retry-After": "2"}), (500, {})]
        res = await s.write("d", "b", make_readings("d", 5))
        assert res.written == 5 and s.retries == 3
        assert clock.slept == [0.1, 2.0, 0.4]  # backoff doubles; Retry-After wins
        f.script = [(503, {})] * 4
        with pytest.raises(StoreUnavailable):
            await s.write("d", "b2", make_readings("d", 5, seq0=6))
        assert (await s.idempotency_state("d")).watermark == 5  # not advanced
        f.script = [(401, {})]
        with pytest.raises(StoreUnavailable):  # an operator must fix auth: no retry loop
            await s.write("d", "b2", make_readings("d", 5, seq0=6))
        f.script = [(400, {})]
        with pytest.raises(StoreRejected):
            await s.write("d", "b2", make_readings("d", 5, seq0=6))
        f.requests.clear()
        f.script = [(200, {})]
        with pytest.raises(StoreUnavailable):
            await s.influxql("SELECT nonsense")
        with pytest.raises(StoreUnavailable):
            await s.influxql("SELECT nonsense")
    finally:
        await s.close()


async def test_unreachable(tmp_path: Path) -> None:
    clock = InstantClock()
    s = await _store(f"http://127.0.0.1:{free_port()}", tmp_path, clock=clock, max_retries=1,
                     backoff_s=0.01)
    clock.slept.clear()  # open()'s CREATE DATABASE retried too
    try:
        with pytest.raises(StoreUnavailable, match="unreachable"):
            await s.write("d", "b", make_readings("d", 2))
        assert clock.slept == [0.01]
        await s.dead_letter("d", "b", "why", b"x")
        assert await s.dead_letters() == [("d", "b", "why")]
    finally:
        await s.close()
    with pytest.raises(RuntimeError):
        await s._request("GET", "/ping", {})


def test_line_format_and_escaping() -> None:
    r = Reading("dev 1", "t,a=b", 1000, 0.1, Priority.CRITICAL, 7, 995, 1, 3,
                AggInfo("", "max", 1000, 4))
    (line,) = reading_lines([r], "my meas")
    assert line == ("my\\ meas,device=dev\\ 1,sensor=t\\,a\\=b,agg_fn=max,agg_rule=- "
                    "value=0.1,seq=7i,priority=0i,quality=1i,uncert_ms=3i,raw_ts_ms=995i,"
                    "agg_window_end_ms=1000i,agg_count=4i 1000000007")  # ms in ns + seq
    assert reading_lines([Reading("d", "s", 5, 2.0, seq=1_000_001)]) == [
        "readings,device=d,sensor=s value=2.0,seq=1000001i,priority=2i,quality=0i,"
        "uncert_ms=0i 5000001"]  # the offset is seq mod 1e6


def test_retry_after_parsing() -> None:
    assert _retry_after(None) is None and _retry_after("x y") is None
    assert _retry_after("3") == 3.0 and _retry_after("-1") == 0.0
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past


def test_bad_version() -> None:
    with pytest.raises(ValueError):
        InfluxStore("http://x", version=3)


async def test_later_request_failing_keeps_the_ledger_on_what_landed(
        fake: tuple[FakeInflux, str], tmp_path: Path) -> None:
    f, url = fake
    s = await _store(url, tmp_path, max_lines=4, max_retries=1)
    try:
        f.fail_writes_after = 2  # requests 1-2 (8 points) land, request 3 fails
        with pytest.raises(StoreUnavailable):
            await s.write("d", "b", make_readings("d", 10))
        assert len(f.points) == 8
        assert (await s.idempotency_state("d")).watermark == 8  # not rolled back
        f.fail_writes_after = None
        res = await s.write("d", "b", make_readings("d", 10))  # the device's retry
        assert (res.written, res.duplicates) == (2, 8) and len(f.points) == 10
        f.fail_writes_after = 0  # the very first request fails: nothing to keep
        with pytest.raises(StoreUnavailable):
            await s.write("d", "c", make_readings("d", 3, seq0=11))
        assert (await s.idempotency_state("d")).watermark == 10
    finally:
        await s.close()


async def test_same_millisecond_readings_are_distinct_points(
        fake: tuple[FakeInflux, str], tmp_path: Path) -> None:
    f, url = fake
    s = await _store(url, tmp_path)
    try:
        rs = [Reading("d", "s", 1000, float(i), seq=i + 1) for i in range(5)]  # one ms
        res = await s.write("d", "b", rs)
        assert res.written == 5
        stamps = [line.rsplit(" ", 1)[1] for line in f.points]
        assert stamps == [str(1000 * 1_000_000 + i + 1) for i in range(5)]
    finally:
        await s.close()


def test_points_that_cannot_be_distinct_are_refused() -> None:
    ok = [Reading("d", "s", 1, 1.0, seq=5), Reading("d", "s", 1, 2.0, seq=999_999)]
    check_points(ok)
    clash = [Reading("d", "s", 1, 1.0, seq=5), Reading("d", "s", 1, 2.0, seq=1_000_005)]
    with pytest.raises(StoreRejected) as err:
        check_points(clash)
    assert err.value.reason == "influx_point_collision"
    check_points([clash[0], msgspec.structs.replace(clash[1], sensor="t")])  # other series
    check_points([clash[0], msgspec.structs.replace(clash[1], ts_ms=2)])  # other ms
    for ts in (9_223_372_036_854, -9_223_372_036_854):
        with pytest.raises(StoreRejected) as err:
            check_points([Reading("d", "s", ts, 1.0, seq=1)])
        assert err.value.reason == "bad_timestamp"
