"""The Redis cache: the production :class:`~imhub.runtime.ports.Cache` on redis-py asyncio.

Built by :mod:`imhub.runtime.wiring` when ``IMHUB_REDIS_URL`` is set; the message
service allocates seqs here, gateways keep presence here, and the RTC service
keeps call state here. Every key starts with the tenant's cache prefix from
:mod:`imhub.runtime.tenancy`.

Losing Redis (FLUSHALL, a restart without persistence) never breaks an
invariant: a missing seq counter is rebuilt from the database's stored maximum
before it hands out anything (two Lua scripts, so the check-and-set is atomic
against other allocators), presence comes back with the next heartbeat, and
call state only affects the ``call_*`` system messages of calls in progress.

Connection errors surface as :class:`~imhub.runtime.errors.Unavailable`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, ParamSpec, TypeVar

import orjson
import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio import retry as redis_retry
from redis.backoff import ExponentialBackoff

from imhub.runtime import errors, tenancy

__all__ = ["RedisCache"]

logger = logging.getLogger(__name__)

# Counters idle this long expire; they are rebuilt from the database on next use.
_SEQ_TTL_MS = 30 * 86400 * 1000

# KEYS[1] counter; ARGV[1] count, ARGV[2] ttl ms.
# The last allocated seq, or -1 when the counter is missing (the caller then
# reads the stored maximum and runs _SEED_SEQ).
_ALLOCATE_SEQ = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
local last = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return last
"""

# KEYS[i] counters; ARGV[i] counts, ARGV[#KEYS + 1] ttl ms. The same as
# _ALLOCATE_SEQ for many conversations in one round trip: a list of last
# allocated seqs, -1 where a counter is missing (nothing is taken for it).
_ALLOCATE_MANY = """
local ttl = ARGV[#KEYS + 1]
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 0 then
    out[i] = -1
  else
    out[i] = redis.call('INCRBY', key, ARGV[i])
    redis.call('PEXPIRE', key, ttl)
  end
end
return out
"""

# KEYS[1] counter; ARGV[1] stored max, ARGV[2] count, ARGV[3] ttl ms.
# Raise the counter to the stored maximum (never lower it: another allocator may
# have seeded it meanwhile), then allocate.
_SEED_SEQ = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
end
local last = redis.call('INCRBY', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return last
"""

# KEYS[1] counter; ARGV[1] floor, ARGV[2] ttl ms.
_RAISE_SEQ = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return 1
"""

# KEYS[1] counter; ARGV[1] last of the block, ARGV[2] first - 1.
# Give the block back only if nothing was allocated after it.
_RELEASE_SEQ = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
  return 1
end
return 0
"""

# Presence: KEYS[1] is a sorted set of gateway instances scored by their expiry
# (ms, Redis server clock, so gateways on other hosts agree).
_NOW_MS = "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000)\n"

# ARGV[1] instance, ARGV[2] ttl ms.
_SET_ONLINE = (
    _NOW_MS
    + """
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local top = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIRE', KEYS[1], math.max(1, tonumber(top[2]) - now))
return 1
"""
)

_ONLINE = (
    _NOW_MS
    + """
return redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')
"""
)

P = ParamSpec("P")
T = TypeVar("T")


def _mapped(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Turn connection failures into ``Unavailable``."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
            raise errors.Unavailable(f"redis is not reachable: {exc}") from exc

    return wrapper


class RedisCache:
    """:class:`~imhub.runtime.ports.Cache` on Redis.

    Args:
        url: ``redis://host:port/db``.
        socket_timeout: seconds a command may take before it fails.
    """

    def __init__(self, url: str, *, socket_timeout: float = 3.0) -> None:
        self._client: aioredis.Redis = aioredis.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=2.0,
            health_check_interval=15,
            # A short retry rides over a dropped connection; a dead server
            # fails fast so the caller can report it.
            retry=redis_retry.Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
            retry_on_error=[redis_errors.ConnectionError],
        )
        self._allocate = self._client.register_script(_ALLOCATE_SEQ)
        self._seed = self._client.register_script(_SEED_SEQ)
        self._allocate_many = self._client.register_script(_ALLOCATE_MANY)
        self._raise = self._client.register_script(_RAISE_SEQ)
        self._release = self._client.register_script(_RELEASE_SEQ)
        self._set_online = self._client.register_script(_SET_ONLINE)
        self._online = self._client.register_script(_ONLINE)

    @property
    def client(self) -> aioredis.Redis:
        return self._client

    @staticmethod
    def _key(tenant_id: str, *parts: str) -> str:
        return tenancy.names_for(tenant_id).cache_prefix + ":".join(parts)

    async def start(self) -> None:
        await self.ping()

    async def close(self) -> None:
        await self._client.aclose()

    @_mapped
    async def ping(self) -> None:
        await self._client.ping()

    # -- seq ------------------------------------------------------------------------

    @_mapped
    async def allocate_seq(
        self,
        tenant_id: str,
        conv_id: str,
        count: int,
        stored_max: Callable[[], Awaitable[int]],
    ) -> int:
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        key = self._key(tenant_id, "seq", conv_id)
        try:
            last = int(await self._allocate(keys=[key], args=[count, _SEQ_TTL_MS]))
        except redis_errors.ResponseError:
            # Not a counter any more: drop it; it is rebuilt from the table below.
            logger.warning("seq counter %s was corrupt; rebuilt from the database", key)
            await self._client.delete(key)
            last = -1
        if last < 0:
            floor = await stored_max()
            last = int(await self._seed(keys=[key], args=[floor, count, _SEQ_TTL_MS]))
        return last - count + 1

    @_mapped
    async def allocate_seqs(
        self,
        tenant_id: str,
        counts: Mapping[str, int],
        stored_max: Callable[[str], Awaitable[int]],
    ) -> dict[str, int]:
        if any(count < 1 for count in counts.values()):
            raise ValueError("counts must be >= 1")
        conv_ids = list(counts)
        keys = [self._key(tenant_id, "seq", c) for c in conv_ids]
        try:
            lasts = await self._allocate_many(
                keys=keys, args=[counts[c] for c in conv_ids] + [_SEQ_TTL_MS]
            )
        except redis_errors.ResponseError:
            # A counter that is not a number (written by hand, or by anything
            # else sharing the Redis): take them one by one, which repairs it.
            return {
                c: await self.allocate_seq(
                    tenant_id, c, counts[c], functools.partial(stored_max, c)
                )
                for c in conv_ids
            }
        firsts: dict[str, int] = {}
        for conv_id, key, last in zip(conv_ids, keys, lasts, strict=True):
            count = counts[conv_id]
            if int(last) < 0:  # rebuilt from the table first, as in allocate_seq
                floor = await stored_max(conv_id)
                last = await self._seed(keys=[key], args=[floor, count, _SEQ_TTL_MS])
            firsts[conv_id] = int(last) - count + 1
        return firsts

    @_mapped
    async def reset_seq(self, tenant_id: str, conv_id: str, floor: int) -> None:
        await self._raise(keys=[self._key(tenant_id, "seq", conv_id)], args=[floor, _SEQ_TTL_MS])

    @_mapped
    async def release_seq(self, tenant_id: str, conv_id: str, first: int, count: int) -> None:
        await self._release(
            keys=[self._key(tenant_id, "seq", conv_id)], args=[first + count - 1, first - 1]
        )

    # -- presence -------------------------------------------------------------------

    @_mapped
    async def set_online(self, tenant_id: str, user_id: str, instance_id: str, ttl: float) -> None:
        ttl_ms = max(1, int(ttl * 1000))
        await self._set_online(
            keys=[self._key(tenant_id, "online", user_id)], args=[instance_id, ttl_ms]
        )

    @_mapped
    async def set_offline(self, tenant_id: str, user_id: str, instance_id: str) -> None:
        await self._client.zrem(self._key(tenant_id, "online", user_id), instance_id)

    @_mapped
    async def online_instances(self, tenant_id: str, user_id: str) -> list[str]:
        raw = await self._online(keys=[self._key(tenant_id, "online", user_id)])
        return sorted(v.decode() if isinstance(v, bytes) else str(v) for v in raw)

    # -- small values ---------------------------------------------------------------

    @_mapped
    async def get_json(self, tenant_id: str, key: str) -> Any | None:
        raw = await self._client.get(self._key(tenant_id, "kv", key))
        return None if raw is None else orjson.loads(raw)

    @_mapped
    async def set_json(self, tenant_id: str, key: str, value: Any, ttl: float) -> None:
        await self._client.set(
            self._key(tenant_id, "kv", key), orjson.dumps(value), px=max(1, int(ttl * 1000))
        )

    @_mapped
    async def delete(self, tenant_id: str, key: str) -> None:
        await self._client.delete(self._key(tenant_id, "kv", key))
