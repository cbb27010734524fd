"""The Redis side of the proxy cluster: the server-side scripts, the client, its errors.

The scripts run atomically on the server (``EVALSHA``, loaded again after a restart by redis-py's
``Script``): :data:`PUT` compares a new entry's (epoch, seq) with the newest any instance stored
and writes both, or neither, and publishes it; :data:`UNLOCK` and :data:`RELEASE` give back a
fetch lock or a relay lease only if it is still the caller's; :data:`LEASE` takes or renews one;
:data:`TAKE` spends a token from two buckets (an origin's, the cluster's) or from neither, by the
server's clock, so that every instance shares one budget.

:func:`connect` makes a client that fails fast (the store's monitor decides when to try again);
:func:`is_outage` tells an unreachable server from a refused command; :func:`reason` is an
error's text for a message (redis-py's texts name the host and port, never the password).

What this module does not do: name keys or seal values (:mod:`proxy.cluster`).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "COMMAND_TIMEOUT",
    "LEASE",
    "PUT",
    "RELEASE",
    "TAKE",
    "UNLOCK",
    "connect",
    "is_outage",
    "reason",
]

#: The most one command may take before the server counts as unreachable.
COMMAND_TIMEOUT = 1.0

# KEYS: version, entry. ARGV: version (32 hex), sealed entry, entry expiry (ms), version
# expiry (ms), channel, message, refresh (1: rewrite an entry of the same version).
# Returns 0: older than the newest stored (refused), 1: the same version, 2: new.
PUT = """
local cur = redis.call('GET', KEYS[1])
if cur and cur > ARGV[1] then return 0 end
if cur == ARGV[1] then
  if ARGV[7] == '1' or redis.call('EXISTS', KEYS[2]) == 0 then
    redis.call('SET', KEYS[2], ARGV[2], 'PXAT', ARGV[3])
  end
  return 1
end
redis.call('SET', KEYS[1], ARGV[1], 'PXAT', ARGV[4])
redis.call('SET', KEYS[2], ARGV[2], 'PXAT', ARGV[3])
redis.call('PUBLISH', ARGV[5], ARGV[6])
return 2
"""
# KEYS: lock. ARGV: token, channel, message. Deletes the lock if still ours, and says so.
UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
"""
# KEYS: lease. ARGV: holder, ttl (ms). Takes a free lease or renews ours: 1; held by another: 0.
LEASE = """
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if not cur then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
return 0
"""
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) return 1 end
return 0
"""
# KEYS: one origin's bucket, the whole cluster's. ARGV: their sizes (tokens per minute, also
# the burst). Takes a token from both, or none: 1 or 0. The server's clock, for every instance.
TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function level(key, size)
  local v = redis.call('HMGET', key, 't', 's')
  local tokens = tonumber(v[1]) or size
  local stamp = tonumber(v[2]) or now
  return math.min(size, tokens + math.max(0, now - stamp) * size / 60000)
end
local a = level(KEYS[1], tonumber(ARGV[1]))
local g = level(KEYS[2], tonumber(ARGV[2]))
if a < 1 or g < 1 then return 0 end
redis.call('HSET', KEYS[1], 't', tostring(a - 1), 's', tostring(now))
redis.call('PEXPIRE', KEYS[1], 120000)
redis.call('HSET', KEYS[2], 't', tostring(g - 1), 's', tostring(now))
redis.call('PEXPIRE', KEYS[2], 120000)
return 1
"""


def connect(url: str, *, password: str | None = None) -> Any:
    """A redis.asyncio client for ``url`` that fails fast: no retries (the store's monitor
    decides when to try again), every command within :data:`COMMAND_TIMEOUT`."""
    import redis.asyncio as redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    extra = {} if password is None else {"password": password}
    return redis.from_url(
        url,
        **extra,
        socket_timeout=COMMAND_TIMEOUT,
        socket_connect_timeout=COMMAND_TIMEOUT,
        retry=Retry(NoBackoff(), 0),
    )


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` means the server cannot be reached (rather than a bad command)."""
    from redis import exceptions

    return isinstance(
        exc, (exceptions.ConnectionError, exceptions.TimeoutError, OSError, TimeoutError)
    ) and not isinstance(exc, exceptions.AuthenticationError)


def reason(exc: BaseException) -> str:
    """An exception's text for a message, never a password: redis-py's texts name hosts and
    ports, not credentials; an empty one becomes its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
