"""The shared per-device rate limiter on the real Redis: replicas share one bucket per
device (N replicas do not allow N times the limit), throttled batches are told when the
next token is due, a missing Redis stops the ingest at start with the key to change, and
a Redis failure while running lets batches through (counted)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cloud.app import CloudApp
from cloud.config import build_ingest, parse_cloud_config
from cloud.ingest import IngestService
from cloud.ratelimit_redis import RedisRateLimiter
from cloud.stores.sqlite import SqliteStore
from pymigrate.errors import ConfigError, ThrottledError
from tests.conftest import free_port, require_service
from tests.unit.cloud_helpers import incoming, make_readings, payload

pytestmark = pytest.mark.integration

URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    """A key prefix of this test only; its keys are deleted afterwards."""
    require_service("Redis", "127.0.0.1", 6379)
    p = f"pmtest:{uuid.uuid4().hex[:10]}:"
    yield p
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(URL)
    try:
        keys = [k async for k in r.scan_iter(match=p + "*")]
        if keys:
            await r.delete(*keys)
    finally:
        await r.aclose()


async def _limiter(prefix: str, rate: float, burst: int) -> RedisRateLimiter:
    lim = RedisRateLimiter(rate, burst, url=URL, key_prefix=prefix)
    await lim.open()
    return lim


async def _taken(lims: list[RedisRateLimiter], device: str, tries: int) -> int:
    ok = 0
    for i in range(tries):
        try:
            await lims[i % len(lims)].check(device)
            ok += 1
        except ThrottledError:
            pass
    return ok


async def test_replicas_share_one_bucket_per_device(prefix: str) -> None:
    # three replicas, a burst of 4 at 0.1 batch/s: together they let 4 through, not 12
    replicas = [await _limiter(prefix, 0.1, 4) for _ in range(3)]
    try:
        assert await _taken(replicas, "dev-a", 12) == 4
        assert sum(r.throttled for r in replicas) == 8
        with pytest.raises(ThrottledError) as ei:
            await replicas[0].check("dev-a")
        assert 0 < ei.value.retry_after_s <= 10.0  # the next token is due within 1/rate
        assert await _taken(replicas, "dev-b", 5) == 4  # every device has its own bucket
    finally:
        for r in replicas:
            await r.close()


async def test_tokens_come_back(prefix: str) -> None:
    lim = await _limiter(prefix, 20.0, 1)  # one token, back after 50 ms
    try:
        await lim.check("d")
        await asyncio.sleep(0.2)
        await lim.check("d")  # refilled (Redis's clock, not ours)
    finally:
        await lim.close()


async def test_ingest_throttles_with_the_shared_limiter(prefix: str, tmp_path: Path) -> None:
    cfg = parse_cloud_config({"rate_limit": {"batches_per_s": 0.1, "burst": 1,
                                             "backend": "redis", "redis_url": URL,
                                             "key_prefix": prefix}})
    stores = [SqliteStore(tmp_path / f"c{i}.db") for i in range(2)]
    services = [build_ingest(cfg, s) for s in stores]
    apps = [CloudApp(s, [], service=svc) for s, svc in zip(stores, services)]
    for app in apps:
        await app.start()
    try:
        data = payload("d", make_readings("d", 3))
        assert (await services[0].handle(incoming(data, "d"))).status == "ok"
        ack = await services[1].handle(incoming(data, "d"))  # the other replica
        assert ack.status == "throttled" and ack.retry_after_s > 0
        assert services[1].counters["throttled"] == 1
    finally:
        for app in apps:
            await app.stop()


async def test_missing_redis_stops_the_start_with_the_key(tmp_path: Path) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    cfg = parse_cloud_config({"rate_limit": {"batches_per_s": 1, "backend": "redis",
                                             "redis_url": dead}})
    store = SqliteStore(tmp_path / "c.db")
    app = CloudApp(store, [], service=build_ingest(cfg, store))
    with pytest.raises(ConfigError) as ei:
        await app.start()
    assert ei.value.key == "cloud.rate_limit.redis_url" and "cannot be reached" in str(ei.value)
    assert store._db is None  # nothing left open


async def test_redis_failure_while_running_lets_batches_pass(tmp_path: Path) -> None:
    lim = RedisRateLimiter(0.1, 1, url=f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2)
    store = SqliteStore(tmp_path / "c.db")
    await store.open()
    svc = IngestService(store, limiter=lim)  # never opened: Redis "went away"
    try:
        for seq0 in (1, 4):
            data = payload("d", make_readings("d", 3, seq0=seq0))
            assert (await svc.handle(incoming(data, "d"))).status == "ok"
        assert lim.errors == 2 and lim.throttled == 0
    finally:
        await lim.close()
        await store.close()


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigError) as ei:
        parse_cloud_config({"rate_limit": {"backend": "redis", "redis_url": "localhost:6379"}})
    assert ei.value.key == "cloud.rate_limit.redis_url"
    with pytest.raises(ConfigError) as ei:
        parse_cloud_config({"rate_limit": {"backend": "memcached"}})
    assert "rate_limit" in str(ei.value)
    with pytest.raises(ValueError):
        RedisRateLimiter(0, 1)
