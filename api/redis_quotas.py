"""Per-key credits and rate limits on Redis, shared by every API replica and worker.

Same semantics as :mod:`diffserve.api.quotas` (one credit is one image; a submission reserves its cost, the
reservation becomes a debit when the job completes and is released when it fails or is cancelled;
a token bucket per key with capacity = the per-minute limit, refilled continuously), with the
state in Redis and every read-modify-write one Lua script, so concurrent replicas can neither
overspend nor share out more tokens than the limit. What each owner has spent and reserved lives
in two hashes (``<ns>:credits:spent``/``:reserved``); allowances come from the settings, as before.
Settling a job (debit or release) takes its job id: a marker ``<ns>:credits:settled:<id>`` makes
the first settlement of a job the only one, so two workers finishing the same job debit once.
Rate buckets use Redis's clock (TIME inside the script), not each replica's, and expire after a
minute idle (a full bucket again). Redis unreachable raises :class:`diffserve.api.redis_client.StoreUnavailable`.
"""

from __future__ import annotations

import logging

import redis

from diffserve.api.quotas import SETTLED_MARKER_TTL_S, InsufficientCredits
from diffserve.api.redis_client import connect, guarded, lua

__all__ = ["RedisCreditLedger", "RedisRateLimiter"]

logger = logging.getLogger(__name__)

_guarded = guarded("the quota store")


class RedisCreditLedger:
    """Credits shared through Redis; the interface of :class:`diffserve.api.quotas.CreditLedger`."""

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
        self._reserve = self._redis.register_script(lua("quota_reserve"))
        self._settle_script = self._redis.register_script(lua("quota_settle"))

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
        return self._settle(owner, cost, debit=False, job_id=job_id)

    def debit(self, owner: str | None, cost: int, *, job_id: str | None = None) -> bool:
        """Charge a completed job (turning its reservation into a debit); with ``job_id`` once per job.

        Returns False when nothing was charged: unlimited owner, or this job was settled already.
        """
        return self._settle(owner, cost, debit=True, job_id=job_id)

    @_guarded
    def _settle(self, owner: str | None, cost: int, *, debit: bool, job_id: str | None) -> bool:
        if self.allowance(owner) is None:
            return False
        marker = self._settled_prefix + (job_id or "")
        applied = self._settle_script(
            keys=[self._spent_key, self._reserved_key, marker],
            args=[owner, int(cost), int(debit), int(job_id is not None), SETTLED_MARKER_TTL_S])
        if not applied:
            logger.info("request %s: credits already settled; %s skipped", job_id, "debit" if debit else "release")
        return bool(applied)

    def close(self) -> None:
        if self._owns_client:
            self._redis.close()


class RedisRateLimiter:
    """Token buckets in Redis keyed by caller; the interface of :class:`diffserve.api.quotas.RateLimiter`."""

    def __init__(self, url: str | None, default_per_minute: int, per_owner: dict[str, int], *,
                 namespace: str = "diffserve", client: redis.Redis | None = None, timeout_s: float = 2.0):
        if client is None and url is None:
            raise ValueError("RedisRateLimiter needs a url or a client")
        self._default = default_per_minute
        self._per_owner = dict(per_owner)
        self._owns_client = client is None
        self._redis = client if client is not None else connect(url, timeout_s=timeout_s)
        self._prefix = "{" + namespace + "}:rate:"
        self._take = self._redis.register_script(lua("quota_take"))

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
