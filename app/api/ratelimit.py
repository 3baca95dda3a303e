"""Per-key rate limits: a token bucket (GCRA) kept in Redis, shared by every API process.

Each key may send `rate` requests per second on average and `burst` at once. Redis holds one
timestamp per key, the "theoretical arrival time"; a Lua script updates it atomically with the
server's clock, so API processes on several machines agree. Without Redis (the embedded default,
one API process) the same rule runs in memory. If Redis cannot be reached the request is let
through: a limiter outage must not take search down with it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any, Protocol

log = logging.getLogger(__name__)

# KEYS[1]: the key's bucket; ARGV: interval (µs per request), burst tolerance (µs).
# Returns 0 when allowed, else the microseconds to wait.
GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - tolerance - interval
if now < allow_at then return allow_at - now end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000) + 1000)
return 0
"""


class Limiter(Protocol):
    def wait_seconds(self, key: str) -> float:
        """0 when the request may go ahead, else how long to wait before the next one."""


class _Params:
    def __init__(self, per_minute: int, burst: int) -> None:
        self.interval_us = 60_000_000 / per_minute
        self.tolerance_us = self.interval_us * max(burst - 1, 0)


class RedisLimiter:
    def __init__(self, redis_url: str, per_minute: int, burst: int, namespace: str) -> None:
        import redis

        self.params = _Params(per_minute, burst)
        self.client: Any = redis.Redis.from_url(redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self.script = self.client.register_script(GCRA)
        self.namespace = namespace

    def wait_seconds(self, key: str) -> float:
        try:
            wait_us = self.script(
                keys=[f"{self.namespace}:ratelimit:{key}"], args=[self.params.interval_us, self.params.tolerance_us]
            )
        except Exception as exc:
            log.warning("rate limiter unavailable, letting the request through: %s", exc)
            return 0.0
        return float(wait_us) / 1e6


class MemoryLimiter:
    """The same rule inside one process (the embedded default has no Redis)."""

    def __init__(self, per_minute: int, burst: int) -> None:
        self.params = _Params(per_minute, burst)
        self.tat: dict[str, float] = {}
        self.lock = threading.Lock()

    def wait_seconds(self, key: str) -> float:
        now = time.monotonic() * 1e6
        with self.lock:
            tat = max(self.tat.get(key, now), now)
            new_tat = tat + self.params.interval_us
            allow_at = new_tat - self.params.tolerance_us - self.params.interval_us
            if now < allow_at:
                return (allow_at - now) / 1e6
            self.tat[key] = new_tat
            return 0.0


class Unlimited:
    def wait_seconds(self, key: str) -> float:
        return 0.0


def make_limiter(redis_url: str | None, per_minute: int, burst: int, namespace: str) -> Limiter:
    if per_minute <= 0:
        return Unlimited()
    if redis_url:
        return RedisLimiter(redis_url, per_minute, burst, namespace)
    return MemoryLimiter(per_minute, burst)


def retry_after(wait: float) -> int:
    """Whole seconds for the Retry-After header, at least 1."""
    return max(1, math.ceil(wait))
