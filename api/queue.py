"""The job queue interface both stores implement, and the one place that chooses the store.

:class:`JobQueue` is what the HTTP layer (routes, deps) and the runner may ask of a job store:
enqueue (with the job's input images), claim -> lease, heartbeat, complete/fail (fenced by the
lease), read status, inputs and outputs, cancel, position, purge, readiness, the feed of finished
jobs that ``/v1`` waits listen to, and the announcement of the slugs a worker takes. Two implementations:
:class:`diffserve.api.jobs.JobStore` (SQLite, embedded, one process) and :class:`diffserve.api.redis_jobs.RedisJobStore`
(Redis, shared by API replicas and workers). Callers never ask which one they hold; blocking
calls go through ``asyncio.to_thread`` on both (both are thread-safe).

:func:`open_stores` is the only code that reads ``settings.redis_url``: it builds the job store,
credits, rate limits, idempotency keys and the webhook outbox on SQLite or on Redis, once, at start-up.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from diffserve.api.idempotency import IdempotencyStore, SqliteIdempotencyStore
from diffserve.api.jobs import Claim, Heartbeat, Job, JobStore
from diffserve.api.quotas import CreditLedger, RateLimiter
from diffserve.api.settings import Settings
from diffserve.api.webhooks import SqliteWebhookOutbox, WebhookOutbox

__all__ = ["JobQueue", "Stores", "check_role", "open_stores"]

logger = logging.getLogger(__name__)


@runtime_checkable
class JobQueue(Protocol):
    """A persistent job queue: records QUEUED -> PROCESSING -> COMPLETED | FAILED with their outputs."""

    name: str
    """``sqlite`` or ``redis``: the key of the store's entry in ``/readyz``."""
    address: str
    """Where the jobs live (a data directory, or Redis's host:port), for logs; never a password."""
    retention_s: float
    max_attempts: int
    heartbeat_interval_s: float
    """How often a running job's lease is confirmed (:meth:`heartbeat`)."""

    def ping(self) -> None:
        """Raise (``StoreUnavailable`` on Redis) unless the store can serve now."""

    def create(self, slug: str, params: dict[str, Any], *, owner: str | None = None, output_format: str = "jpeg",
               want_base64: bool = False, inputs: Mapping[str, bytes] | None = None, priority: int = 0,
               job_id: str | None = None) -> Job:
        """Enqueue a new QUEUED job with its input images (``{param: .npy bytes}``) and return it;
        ``priority`` (0 to ``MAX_PRIORITY``) places it in the claim order (``diffserve.api.jobs.claim_rank``).
        ``job_id`` (drawn beforehand, e.g. by an idempotency reservation) is the new job's id: raises
        ``diffserve.api.jobs.DuplicateJob`` when a job has it already, and nothing is queued."""

    def get(self, job_id: str) -> Job | None:
        """The job (status, progress, error, outputs' names), or None if unknown or expired."""

    def read_inputs(self, job_id: str) -> dict[str, bytes]:
        """The input images stored with the job (gone once it finished)."""

    def read_output(self, job_id: str, index: int) -> bytes | None:
        """Output ``index`` of a COMPLETED job, or None (no such output, or expired)."""

    def claim(self, consumer: str, slugs: Sequence[str], *, block_s: float = 0.0) -> Claim | None:
        """Lease the first job of ``slugs`` in claim order to ``consumer`` (PROCESSING, one more attempt); waits up
        to ``block_s`` for one to be enqueued. None if none came."""

    def heartbeat(self, claim: Claim) -> Heartbeat:
        """Keep the lease; says whether it still holds the job and whether a cancel was asked."""

    def set_progress(self, job_id: str, step: int, total: int | None) -> bool: ...

    def complete(self, job_id: str, outputs: list[bytes], ext: str, metrics: dict[str, Any],
                 seed: int | None) -> Job: ...

    def fail(self, job_id: str, error: str, metrics: dict[str, Any] | None = None, *,
             claim: Claim | None = None) -> Job:
        """FAIL a QUEUED or PROCESSING job (terminal ones unchanged); with ``claim`` only while that
        lease still holds it."""

    def request_cancel(self, job_id: str) -> Job | None:
        """QUEUED fails at once, PROCESSING gets a flag its runner polls; None if unknown/expired."""

    def is_cancel_requested(self, job_id: str) -> bool: ...

    def position(self, job_id: str) -> int | None:
        """0-based place of a QUEUED job in the order jobs are claimed, else None."""

    def queue_depth(self) -> int: ...

    def count_by_status(self) -> dict[str, int]: ...

    def served_slugs(self) -> Mapping[str, list[str]]:
        """Slugs other processes' workers announce on this store (none on an embedded store)."""

    def advertise(self, worker: str, slugs: Sequence[str], ttl_s: float) -> None:
        """Announce that ``worker`` takes jobs of ``slugs`` for the next ``ttl_s`` seconds."""

    def withdraw(self, worker: str) -> None: ...

    def finished_ids(self) -> list[str]:
        """Ids of the unexpired COMPLETED and FAILED jobs (the runner's settlement sweep)."""

    def listen_finished(self, on_finished: Callable[[str], None], should_stop: Callable[[], bool]) -> None:
        """Call ``on_finished(job_id)`` for jobs reaching COMPLETED or FAILED until ``should_stop()``
        (blocking; may miss some, so waiters re-read their job now and then)."""

    def recover(self) -> dict[str, int]:
        """Start-up repair of what a dead process left (requeue, or fail); counts per outcome."""

    def purge_expired(self) -> int: ...

    def close(self) -> None: ...


@dataclass
class Stores:
    """What ``open_stores`` built: the job store and the credit and rate bookkeeping beside it."""

    jobs: JobQueue
    ledger: CreditLedger
    limiter: RateLimiter
    idempotency: IdempotencyStore
    """``Idempotency-Key`` records (diffserve.api.idempotency)."""
    webhooks: WebhookOutbox
    """Pending webhook deliveries (diffserve.api.webhooks)."""


def check_role(settings: Settings, role: str) -> None:
    """Raise ValueError when ``role`` (``api``, ``worker``) needs a store shared between processes
    and the settings name none (checked before a server starts, and again by ``open_stores``)."""
    if role != "all" and settings.redis_url is None:
        raise ValueError(f"the {role} role needs a shared store: set DIFFSERVE_REDIS_URL (or --redis-url)")


def open_stores(settings: Settings, role: str = "all") -> Stores:
    """The job store, credits and rate limits on SQLite or, with ``redis_url``, on Redis.

    Raises ValueError when ``role`` (``api``, ``worker``) needs a store shared between processes
    and none is configured.
    """
    check_role(settings, role)
    default_credits, credits_by_owner = settings.per_owner(settings.credits)
    default_rate, rate_by_owner = settings.per_owner(settings.rate_limit_per_minute)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if settings.redis_url is None:
        store = JobStore(settings.jobs_db_path, outputs_dir=settings.outputs_dir,
                         retention_s=settings.retention_s, max_attempts=settings.request_max_attempts,
                         priority_aging_s=settings.priority_aging_s, synchronous=settings.sqlite_synchronous)
        ledger = CreditLedger(settings.data_dir / "credits.sqlite", default_credits, credits_by_owner)
        return Stores(store, ledger, RateLimiter(default_rate or 0, rate_by_owner),
                      SqliteIdempotencyStore(settings.data_dir / "idempotency.sqlite", settings.idempotency_retention_s),
                      SqliteWebhookOutbox(settings.data_dir / "webhooks.sqlite"))

    from diffserve.api.idempotency import RedisIdempotencyStore
    from diffserve.api.redis_client import connect, read_password_file
    from diffserve.api.redis_jobs import RedisJobStore
    from diffserve.api.redis_quotas import RedisCreditLedger, RedisRateLimiter
    from diffserve.api.webhooks import RedisWebhookOutbox

    client = connect(settings.redis_url, password=read_password_file(settings.redis_password_file))
    ns = settings.redis_namespace
    redis_store = RedisJobStore(settings.redis_url, namespace=ns, retention_s=settings.retention_s,
                                max_attempts=settings.request_max_attempts, reclaim_idle_s=settings.reclaim_idle_s,
                                priority_aging_s=settings.priority_aging_s, client=client)
    ledger = RedisCreditLedger(None, default_credits, credits_by_owner, namespace=ns, client=client)
    limiter = RedisRateLimiter(None, default_rate or 0, rate_by_owner, namespace=ns, client=client)
    try:
        persistence = redis_store.persistence()
        if persistence and (persistence.get("appendonly") != "yes"
                            or persistence.get("maxmemory-policy") != "noeviction"):
            logger.warning("Redis persistence %s can lose accepted jobs; run it with appendonly yes, "
                           "appendfsync always, maxmemory-policy noeviction", persistence)
    except Exception as exc:  # noqa: BLE001 - Redis may be down at start; service resumes when it returns
        logger.warning("Redis at %s is not reachable yet: %s", redis_store.address, exc)
    return Stores(redis_store, ledger, limiter,
                  RedisIdempotencyStore(client, ns, settings.idempotency_retention_s), RedisWebhookOutbox(client, ns))
