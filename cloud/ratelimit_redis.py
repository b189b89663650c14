"""Per-device token bucket shared by every ingest replica, in Redis
(``[cloud.rate_limit] backend = "redis"``).

The in-memory limiter (:class:`cloud.ratelimit.DeviceRateLimiter`) lives in one
replica: N replicas behind a broker let a device send N times its limit. Here each
device's bucket is one Redis hash (``<key_prefix><device>``: tokens, time of the last
update) that a Lua script reads, refills, takes from and writes back atomically: Redis
runs a script alone, so replicas never both take the last token. The time is Redis's own
(``TIME``), so replicas with skewed clocks still agree. An idle bucket expires once it
would be full again (``burst / rate``), which forgets nothing.

Start-up pings Redis: when it cannot be reached the ingest does not start, with a
:class:`~pymigrate.errors.ConfigError` naming ``cloud.rate_limit.redis_url`` (a shared
limit silently turned into none, or into per-replica ones, is worse than not starting).
Once running, a Redis error or timeout (``timeout_s``) lets the batch through: the
limiter protects the ingest, it must not become its outage. Each such batch is counted
(``errors``) and logged (at most once a minute).
"""

from __future__ import annotations

import time
from typing import Any

import structlog

from pymigrate.errors import ConfigError, ThrottledError

__all__ = ["RedisRateLimiter", "TOKEN_BUCKET_LUA"]

log = structlog.get_logger("pymigrate.cloud.ratelimit")

# KEYS[1] bucket; ARGV[1] rate (tokens/s), ARGV[2] burst. Returns {allowed, retry_after}.
# Numbers leave Lua as strings: Redis would truncate a Lua number to an integer.
TOKEN_BUCKET_LUA = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local b = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(b[1])
local at = tonumber(b[2])
if tokens == nil or at == nil then
  tokens = burst
  at = now
end
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local allowed = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
if allowed == 1 then
  return {1, '0'}
end
return {0, tostring((1 - tokens) / rate)}
"""


class RedisRateLimiter:
    """Token bucket per device id in Redis; ``await check(device_id)`` takes a token or
    raises :class:`ThrottledError` (``retry_after_s``: when the next token is due)."""

    def __init__(self, batches_per_s: float, burst: int = 10, *,
                 url: str = "redis://127.0.0.1:6379/0", key_prefix: str = "pymigrate:rl:",
                 timeout_s: float = 0.5) -> None:
        if batches_per_s <= 0 or burst < 1:
            raise ValueError("batches_per_s must be > 0 and burst >= 1")
        self.rate = batches_per_s
        self.burst = burst
        self.url = url
        self.key_prefix = key_prefix
        self.timeout_s = timeout_s
        self.throttled = 0
        self.errors = 0  # batches let through because Redis did not answer
        self._redis: Any = None
        self._script: Any = None
        self._logged_at = 0.0

    def _client(self) -> Any:
        try:
            import redis.asyncio as aioredis
        except ImportError as exc:
            raise ConfigError("cloud.rate_limit.backend",
                              "'redis' needs the redis package: pip install "
                              "'pymigrate-iot[redis]'") from exc
        return aioredis.Redis.from_url(self.url, socket_timeout=self.timeout_s,
                                       socket_connect_timeout=self.timeout_s)

    async def open(self) -> None:
        """Connect and ping; ConfigError naming the setting when Redis is unreachable."""
        if self._redis is None:
            self._redis = self._client()
            self._script = self._redis.register_script(TOKEN_BUCKET_LUA)
        try:
            await self._redis.ping()
        except Exception as exc:  # redis-py's ConnectionError, TimeoutError, auth ...
            await self.close()
            raise ConfigError("cloud.rate_limit.redis_url",
                              f"backend = 'redis' but Redis at {self.url} cannot be reached "
                              f"({type(exc).__name__}: {exc}); start Redis, fix the URL, or "
                              "set backend = 'memory' (each replica then limits on its own)"
                              ) from exc

    async def close(self) -> None:
        r, self._redis = self._redis, None
        self._script = None
        if r is not None:
            await r.aclose()

    async def check(self, device_id: str) -> None:
        """Take one token or raise ThrottledError; a Redis failure lets the batch pass."""
        if self._script is None:
            self._redis = self._client()
            self._script = self._redis.register_script(TOKEN_BUCKET_LUA)
        try:
            allowed, retry_after = await self._script(
                keys=[self.key_prefix + device_id], args=[repr(self.rate), self.burst])
        except Exception as exc:  # the limiter must not take the ingest down
            self.errors += 1
            now = time.monotonic()
            if now - self._logged_at >= 60.0 or self.errors == 1:
                self._logged_at = now
                log.warning("shared rate limiter unavailable: batches pass unlimited",
                            url=self.url, error=f"{type(exc).__name__}: {exc}"[:200],
                            errors=self.errors)
            return
        if int(allowed) != 1:
            self.throttled += 1
            raise ThrottledError(f"device {device_id} over {self.rate}/s",
                                 retry_after_s=float(retry_after), device=device_id)
