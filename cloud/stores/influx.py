"""InfluxDB store over the HTTP line-protocol write API (v1 ``/write``, v2 ``/api/v2/write``).

One point per reading, precision ns::

    readings,device=<id>,sensor=<s>[,agg_fn=<fn>,agg_rule=<rule>] value=<f>,seq=<n>i,
        priority=<n>i,quality=<n>i,uncert_ms=<n>i[,raw_ts_ms=<n>i]
        [,agg_window_end_ms=<n>i,agg_count=<n>i] <ts_ms * 1e6 + seq % 1e6>

Every reading its own point: InfluxDB identifies a point by measurement, tag set and
timestamp, and overwrites on a match. Readings carry milliseconds, so the point's
timestamp is ``ts_ms`` in nanoseconds plus a sub-millisecond offset derived from the
sequence number (``seq mod 1,000,000`` ns): two readings of one sensor in the same
millisecond are two points, and a resent reading lands on itself. Queries floor the
timestamp back to milliseconds (``time // 1e6``), so nothing reads the offset as time.
Two readings of one series collide only when they share the millisecond *and* their seqs
differ by a multiple of 1,000,000; within one batch that is refused
(``influx_point_collision``, dead-lettered with the batch) rather than overwritten.
``ts_ms`` must lie within InfluxDB's nanosecond range (years 1677-2262), else
``bad_timestamp``.

The per-device sequence state (what makes a resend ack ``duplicate`` and write nothing)
lives in a :class:`~cloud.stores.ledger.SqliteLedger` file beside the ingest
(``ledger_path``), with the dead letters; replicas on one host share it. Replicas on
several hosts share a :class:`~cloud.stores.ledger_pg.PgLedger` in PostgreSQL instead
(``ledger_dsn``), and stay exactly-once; with a file per host each would write a batch
both receive, and only the overwrite of the same point would hide it. ``accepted`` counts
the points of the requests InfluxDB answered 2xx; when a later request of a batch fails,
the ledger keeps the seqs that landed and the resend writes only the rest.

Transient failures (connection refused or reset, timeouts, 5xx, 429) are retried with
exponential backoff, obeying ``Retry-After``, up to ``max_retries``; then
:class:`~cloud.stores.base.StoreUnavailable` (the device retries later). A 400 (unparsable
point, field type conflict) is :class:`~cloud.stores.base.StoreRejected`. InfluxDB has no
multi-request transaction: a batch split over several requests (``max_lines``) that fails
half way is not acked, and its resend overwrites what landed. NaN and infinities cannot be
written in line protocol and are rejected before anything is sent.

Queries (:meth:`InfluxStore.query`, :meth:`InfluxStore.count`) use InfluxQL on ``/query``;
on InfluxDB 2.x that is the v1-compatibility endpoint (bucket mapped as database).
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from cloud.stores.base import (
    StoreRejected,
    StoreUnavailable,
)
from cloud.stores.ledger import Ledger, LedgerBacked, SinkOutcome, SqliteLedger
from pymigrate.clock import Clock, WallClock
from pymigrate.lineproto import escape_key, escape_measurement
from pymigrate.types import AggInfo, Priority, Reading

__all__ = ["InfluxStore", "reading_lines"]

_INT_FIELDS = ("seq", "priority", "quality", "uncert_ms", "raw_ts_ms", "agg_window_end_ms",
               "agg_count")
NS_PER_MS = 1_000_000
# InfluxDB's time range in ns is int64 (less a few reserved values): ms that fit after * 1e6
MIN_TS_MS = -9_223_372_036_853
MAX_TS_MS = 9_223_372_036_853


def point_ns(r: Reading) -> int:
    """The point timestamp of a reading: its millisecond plus ``seq mod 1e6`` ns."""
    return r.ts_ms * NS_PER_MS + r.seq % NS_PER_MS


def check_points(readings: Sequence[Reading]) -> None:
    """Refuse what cannot be its own point (module docstring) before anything is sent."""
    for r in readings:
        if not MIN_TS_MS <= r.ts_ms <= MAX_TS_MS:
            raise StoreRejected(f"timestamp {r.ts_ms} ms of seq {r.seq} is outside InfluxDB's"
                                " range (years 1677-2262)", reason="bad_timestamp")
    seqs = [r.seq for r in readings]
    if not seqs or max(seqs) - min(seqs) < NS_PER_MS:
        return  # offsets within one batch are all distinct
    seen: dict[tuple[str, str, str, str, int], int] = {}
    for r in readings:
        a = r.agg
        key = (r.device_id, r.sensor, a.fn if a else "", a.rule if a else "", point_ns(r))
        other = seen.setdefault(key, r.seq)
        if other != r.seq:
            raise StoreRejected(f"seqs {other} and {r.seq} of {r.sensor} share a millisecond"
                                " and a point timestamp", reason="influx_point_collision")


def reading_lines(readings: Sequence[Reading], measurement: str = "readings",
                  instance: str = "") -> list[str]:
    """Line-protocol points (precision ns, :func:`point_ns`) for readings, one each;
    ``instance`` (the agent's stream id) becomes a tag, so two agents configured with one
    device id never overwrite each other's points."""
    meas = escape_measurement(measurement)
    out: list[str] = []
    append = out.append
    tags_cache: dict[tuple[str, str, str, str], str] = {}
    for r in readings:
        a = r.agg
        tk = (r.device_id, r.sensor, a.fn, a.rule) if a else (r.device_id, r.sensor, "", "")
        tags = tags_cache.get(tk)
        if tags is None:
            tags = f"{meas},device={escape_key(r.device_id)},sensor={escape_key(r.sensor)}"
            if instance:
                tags += f",instance={escape_key(instance)}"
            if a is not None:
                tags += f",agg_fn={escape_key(a.fn or '-')},agg_rule={escape_key(a.rule or '-')}"
            tags_cache[tk] = tags
        line = (f"{tags} value={r.value!r},seq={r.seq}i,priority={int(r.priority)}i,"
                f"quality={r.quality}i,uncert_ms={r.uncert_ms}i")
        if r.raw_ts_ms is not None:
            line += f",raw_ts_ms={r.raw_ts_ms}i"
        if a is not None:
            line += f",agg_window_end_ms={a.window_end_ms}i,agg_count={a.count}i"
        append(f"{line} {r.ts_ms * NS_PER_MS + r.seq % NS_PER_MS}")
    return out


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _q(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


class InfluxStore(LedgerBacked):
    """Idempotent InfluxDB 1.x/2.x store (see module docstring)."""

    name = "influx"

    def __init__(self, url: str, *, version: int = 1, db: str = "pymigrate", rp: str = "",
                 token: str = "", org: str = "", bucket: str = "", username: str = "",
                 password: str = "", measurement: str = "readings",
                 ledger_path: str | Path = "influx-ledger.db",
                 ledger: Ledger | None = None, create_db: bool = True,
                 clock: Clock | None = None, max_retries: int = 5, backoff_s: float = 0.2,
                 max_backoff_s: float = 10.0, timeout_s: float = 10.0,
                 max_lines: int = 20_000) -> None:
        if version not in (1, 2):
            raise ValueError("influx version must be 1 or 2")
        self.url = url.rstrip("/")
        self.version = version
        self.db, self.rp = db, rp
        self.token, self.org, self.bucket = token, org, bucket or db
        self.username, self.password = username, password
        self.measurement = measurement
        # a PgLedger (shared by replicas on every host) or a SQLite file on this host
        self.ledger: Ledger = ledger if ledger is not None else SqliteLedger(ledger_path)
        self.create_db = create_db
        self.clock = clock or WallClock()
        self.max_retries = max_retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.max_lines = max_lines
        self.retries = 0  # transient failures retried (counter)
        self._session: aiohttp.ClientSession | None = None

    # -- lifecycle --------------------------------------------------------------------------
    async def open(self) -> None:
        await self.ledger.open()
        self._session = aiohttp.ClientSession(timeout=self.timeout)
        if self.version == 1 and self.create_db:
            # idempotent; a server not up yet is an outage the first write reports
            try:
                await self._request("POST", "/query", {"q": f'CREATE DATABASE "{self.db}"'})
            except StoreUnavailable:
                pass

    async def close(self) -> None:
        if self._session is not None:
            s, self._session = self._session, None
            await s.close()
        await self.ledger.close()

    # -- HTTP -------------------------------------------------------------------------------
    def _auth(self, params: dict[str, str]) -> dict[str, str]:
        headers: dict[str, str] = {}
        if self.token:
            headers["Authorization"] = f"Token {self.token}"
        elif self.username:
            params["u"], params["p"] = self.username, self.password
        return headers

    async def _request(self, method: str, path: str, params: dict[str, str],
                       body: bytes | None = None) -> bytes:
        if self._session is None:
            raise RuntimeError("store is not open")
        headers = self._auth(params)
        delay = self.backoff_s
        for attempt in range(self.max_retries + 1):
            wait: float | None = None
            try:
                async with self._session.request(method, self.url + path, params=params,
                                                  data=body, headers=headers) as resp:
                    data = await resp.read()
                    if resp.status < 300:
                        return data
                    text = data[:300].decode("utf-8", "replace").strip()
                    if resp.status == 400:
                        raise StoreRejected(f"InfluxDB refused the points: {text}",
                                            reason="influx_bad_request")
                    err = StoreUnavailable(f"InfluxDB answered {resp.status}: {text}",
                                           status=resp.status)
                    if resp.status != 429 and resp.status < 500:
                        raise err  # auth, missing database: an operator has to act
                    wait = _retry_after(resp.headers.get("Retry-After"))
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                err = StoreUnavailable(f"InfluxDB unreachable: {type(exc).__name__}: {exc}")
                err.__cause__ = exc
            if attempt == self.max_retries:
                raise err
            self.retries += 1
            await self.clock.sleep(min(self.max_backoff_s, delay if wait is None else wait))
            delay = min(self.max_backoff_s, delay * 2)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _write_lines(self, lines: list[str]) -> tuple[int, Exception | None]:
        """POST ``lines`` in requests of ``max_lines``; returns how many landed, and the
        error that stopped it (None when all did)."""
        if self.version == 1:
            path = "/write"
            params = {"db": self.db, "precision": "ns"}
            if self.rp:
                params["rp"] = self.rp
        else:
            path = "/api/v2/write"
            params = {"org": self.org, "bucket": self.bucket, "precision": "ns"}
        for i in range(0, len(lines), self.max_lines):
            body = "\n".join(lines[i:i + self.max_lines]).encode()
            try:
                await self._request("POST", path, dict(params), body)
            except (StoreRejected, StoreUnavailable) as exc:
                return i, exc
        return len(lines), None

    async def influxql(self, q: str) -> list[dict[str, Any]]:
        """Run an InfluxQL query; returns the first statement's series (name/columns/values),
        times in epoch nanoseconds."""
        import json

        db = self.db if self.version == 1 else self.bucket
        data = await self._request("GET", "/query", {"db": db, "q": q, "epoch": "ns"})
        doc = json.loads(data)
        if "error" in doc:
            raise StoreUnavailable(f"InfluxQL error: {doc['error']}")
        results = doc.get("results") or [{}]
        if "error" in results[0]:
            raise StoreUnavailable(f"InfluxQL error: {results[0]['error']}")
        return list(results[0].get("series") or [])

    # -- Store ------------------------------------------------------------------------------
    async def _sink(self, readings: list[Reading], instance: str = "") -> SinkOutcome:
        check_points(readings)
        landed, error = await self._write_lines(reading_lines(readings, self.measurement,
                                                              instance))
        if error is not None and landed == 0:
            raise error  # nothing landed: the batch fails whole
        return SinkOutcome(readings[:landed], error=error)

    def _where(self, device_id: str, sensor: str | None, start_ms: int | None,
               end_ms: int | None) -> str:
        w = f'"device" = {_q(device_id)}'
        if sensor is not None:
            w += f' AND "sensor" = {_q(sensor)}'
        if start_ms is not None:
            w += f" AND time >= {int(start_ms)}ms"
        if end_ms is not None:
            w += f" AND time < {int(end_ms)}ms"
        return w

    async def query(self, device_id: str, sensor: str | None = None,
                    start_ms: int | None = None, end_ms: int | None = None) -> list[Reading]:
        meas = '"' + self.measurement.replace('"', '\\"') + '"'
        series = await self.influxql(
            f"SELECT * FROM {meas} WHERE {self._where(device_id, sensor, start_ms, end_ms)}")
        out: list[Reading] = []
        for s in series:
            cols = s["columns"]
            for vals in s["values"]:
                row = dict(zip(cols, vals))
                ints = {k: (None if row.get(k) is None else int(row[k])) for k in _INT_FIELDS}
                agg = None
                if row.get("agg_fn") is not None:
                    agg = AggInfo(str(row.get("agg_rule") or ""), str(row["agg_fn"]),
                                  ints["agg_window_end_ms"] or 0, ints["agg_count"] or 0)
                out.append(Reading(
                    device_id=str(row["device"]), sensor=str(row["sensor"]),
                    ts_ms=int(row["time"]) // NS_PER_MS, value=float(row["value"]),
                    priority=Priority(ints["priority"] or 0), seq=ints["seq"] or 0,
                    raw_ts_ms=ints["raw_ts_ms"], quality=ints["quality"] or 0,
                    uncert_ms=ints["uncert_ms"] or 0, agg=agg))
        out.sort(key=lambda r: (r.sensor, r.ts_ms, r.seq))
        return out

    async def count(self, device_id: str | None = None) -> int:
        meas = '"' + self.measurement.replace('"', '\\"') + '"'
        where = "" if device_id is None else f" WHERE \"device\" = {_q(device_id)}"
        series = await self.influxql(f'SELECT count("value") FROM {meas}{where}')
        return sum(int(v[1]) for s in series for v in s["values"])

    async def drop(self) -> None:
        """Drop the v1 database (tests and benchmarks)."""
        await self._request("POST", "/query", {"q": f'DROP DATABASE "{self.db}"'})
