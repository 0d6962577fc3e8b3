"""Per-key credits and rate limits on Redis, shared by every API replica and worker.

Same semantics as :mod:`api.quotas` (one credit is one image; a submission reserves its cost, the
reservation becomes a debit when the job completes and is released when it fails or is cancelled;
a token bucket per key with capacity = the per-minute limit, refilled continuously), with the
state in Redis and every read-modify-write one Lua script, so concurrent replicas can neither
overspend nor share out more tokens than the limit. What each owner has spent and reserved lives
in two hashes (``<ns>:credits:spent``/``:reserved``); allowances come from the settings, as before.
Settling a job (debit or release) takes its job id: a marker ``<ns>:credits:settled:<id>`` makes
the first settlement of a job the only one, so two workers finishing the same job debit once.
Rate buckets use Redis's clock (TIME inside the script), not each replica's, and expire after a
minute idle (a full bucket again). Redis unreachable raises :class:`api.redis_jobs.StoreUnavailable`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, Final, TypeVar

import redis

from api.quotas import InsufficientCredits
from api.redis_jobs import StoreUnavailable, connect

__all__ = ["RedisCreditLedger", "RedisRateLimiter"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

# How long a job's settlement marker outlives it; longer than any job stays queued or kept.
SETTLED_MARKER_TTL_S: Final = 7 * 24 * 3600


def _guarded(method: Callable[..., _T]) -> Callable[..., _T]:
    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> _T:
        try:
            return method(self, *args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StoreUnavailable(f"the quota store (Redis) is unreachable: {exc}") from exc
        except redis.ResponseError as exc:
            if str(exc).startswith(("LOADING", "MISCONF", "READONLY", "MASTERDOWN")):
                raise StoreUnavailable(f"the quota store (Redis) refuses work: {exc}") from exc
            raise
    return wrapper


# KEYS: spent, reserved. ARGV: owner, allowance, cost. Returns {1, left} or {0, left}.
_RESERVE: Final = """
local spent = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local reserved = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
local left = tonumber(ARGV[2]) - spent - reserved
local cost = tonumber(ARGV[3])
if left < cost then return {0, left} end
redis.call('HINCRBY', KEYS[2], ARGV[1], cost)
return {1, left - cost}
"""

# KEYS: spent, reserved, settled marker ('' key name unused when no job id). ARGV: owner, cost,
# debit (1) or release (0), reserved (1/0), has job id (1/0), marker ttl s. Returns 1 if applied.
_SETTLE: Final = """
if ARGV[5] == '1' then
  if not redis.call('SET', KEYS[3], ARGV[3], 'NX', 'EX', ARGV[6]) then return 0 end
end
local cost = tonumber(ARGV[2])
if ARGV[4] == '1' then
  local reserved = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
  local after = reserved - cost
  if after < 0 then after = 0 end
  redis.call('HSET', KEYS[2], ARGV[1], after)
end
if ARGV[3] == '1' then redis.call('HINCRBY', KEYS[1], ARGV[1], cost) end
return 1
"""

# KEYS: bucket. ARGV: capacity (per minute). Returns {allowed 1/0, ms until the next token}.
_TAKE: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local capacity = tonumber(ARGV[1])
local rate = capacity / 60
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens, last = tonumber(b[1]), tonumber(b[2])
if tokens == nil then tokens, last = capacity, now end
tokens = math.min(capacity, tokens + math.max(0, now - last) * rate)
local allowed, wait_ms = 0, 0
if tokens >= 1 then
  tokens, allowed = tokens - 1, 1
else
  wait_ms = math.max(1, math.ceil((1 - tokens) / rate * 1000))
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens), 'ts', string.format('%.6f', now))
redis.call('PEXPIRE', KEYS[1], 61000)
return {allowed, wait_ms}
"""


class RedisCreditLedger:
    """Credits shared through Redis; the interface of :class:`api.quotas.CreditLedger`."""

    def __init__(self, url: str | None, default: int | None, per_owner: dict[str, int], *,
                 namespace: str = "diffserve", client: redis.Redis | None = None, timeout_s: float = 2.0):
        """``default`` applies to every owner without an entry in ``per_owner``; None: unlimited."""
        if client is None and url is None:
            raise ValueError("RedisCreditLedger needs a url or a client")
        self._default = default
        self._per_owner = dict(per_owner)
        self._owns_client = client is None
        self._redis = client if client is not None else connect(url, timeout_s=timeout_s)
        ns = "{" + namespace + "}"
        self._spent_key = f"{ns}:credits:spent"
        self._reserved_key = f"{ns}:credits:reserved"
        self._settled_prefix = f"{ns}:credits:settled:"
        self._reserve = self._redis.register_script(_RESERVE)
        self._settle_script = self._redis.register_script(_SETTLE)

    @property
    def enabled(self) -> bool:
        return self._default is not None or bool(self._per_owner)

    def allowance(self, owner: str | None) -> int | None:
        if owner is None:
            return None
        return self._per_owner.get(owner, self._default)

    @_guarded
    def remaining(self, owner: str | None) -> int | None:
        """Credits left after debits and reservations (never negative); None: unlimited."""
        allowance = self.allowance(owner)
        if allowance is None:
            return None
        pipe = self._redis.pipeline(transaction=True)
        pipe.hget(self._spent_key, owner)
        pipe.hget(self._reserved_key, owner)
        spent, reserved = pipe.execute()
        return max(0, allowance - int(spent or 0) - int(reserved or 0))

    @_guarded
    def reserve(self, owner: str | None, cost: int) -> None:
        """Hold ``cost`` credits for a submission; raises InsufficientCredits when they are not there."""
        allowance = self.allowance(owner)
        if allowance is None:
            return
        ok, left = self._reserve(keys=[self._spent_key, self._reserved_key], args=[owner, allowance, int(cost)])
        if not ok:
            raise InsufficientCredits(max(0, int(left)), cost)

    def release(self, owner: str | None, cost: int, *, job_id: str | None = None) -> bool:
        """Give back a failed or cancelled job's reservation; with ``job_id`` at most once per job."""
        return self._settle(owner, cost, debit=False, reserved=True, job_id=job_id)

    def debit(self, owner: str | None, cost: int, *, reserved: bool = True, job_id: str | None = None) -> bool:
        """Charge a completed job (turning its reservation into a debit); with ``job_id`` once per job.

        Returns False when nothing was charged: unlimited owner, or this job was settled already.
        """
        return self._settle(owner, cost, debit=True, reserved=reserved, job_id=job_id)

    @_guarded
    def _settle(self, owner: str | None, cost: int, *, debit: bool, reserved: bool, job_id: str | None) -> bool:
        if self.allowance(owner) is None:
            return False
        marker = self._settled_prefix + (job_id or "")
        applied = self._settle_script(
            keys=[self._spent_key, self._reserved_key, marker],
            args=[owner, int(cost), int(debit), int(reserved), int(job_id is not None), SETTLED_MARKER_TTL_S])
        if not applied:
            logger.info("request %s: credits already settled; %s skipped", job_id, "debit" if debit else "release")
        return bool(applied)

    def close(self) -> None:
        if self._owns_client:
            self._redis.close()


class RedisRateLimiter:
    """Token buckets in Redis keyed by caller; the interface of :class:`api.quotas.RateLimiter`."""

    def __init__(self, url: str | None, default_per_minute: int, per_owner: dict[str, int], *,
                 namespace: str = "diffserve", client: redis.Redis | None = None, timeout_s: float = 2.0):
        if client is None and url is None:
            raise ValueError("RedisRateLimiter needs a url or a client")
        self._default = default_per_minute
        self._per_owner = dict(per_owner)
        self._owns_client = client is None
        self._redis = client if client is not None else connect(url, timeout_s=timeout_s)
        self._prefix = "{" + namespace + "}:rate:"
        self._take = self._redis.register_script(_TAKE)

    def limit(self, owner: str | None) -> int:
        if owner is not None and owner in self._per_owner:
            return self._per_owner[owner]
        return self._default

    @_guarded
    def check(self, bucket_key: str, owner: str | None) -> float | None:
        """None if allowed (a token is taken), else the seconds until the next token."""
        per_minute = self.limit(owner)
        if per_minute <= 0:
            return None
        allowed, wait_ms = self._take(keys=[self._prefix + bucket_key], args=[per_minute])
        return None if allowed else max(0.001, int(wait_ms) / 1000.0)

    def close(self) -> None:
        if self._owns_client:
            self._redis.close()
